"""Model catalog files: sizes, prices, routes and limits per model, in YAML or JSON.

    models:
      Qwen3-8B: {params_b: 8.2, layers: 36, hidden: 4096, input_usd_per_mtok: 0.05, output_usd_per_mtok: 0.2}
      gpt-4o-mini: {params_b: 8, route: openai/gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}

The top-level ``models:`` key is optional. A catalog never holds API keys: litellm reads them from the
provider's environment variables.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from graphs.cost import ModelSpec
from graphs.errors import DataError

__all__ = ["load_catalog"]

_SECRET_HINTS = ("key", "token", "secret", "password")


def load_catalog(path: str | Path) -> dict[str, ModelSpec]:
    """Read a catalog file; ``DataError`` with the file, the model and the field at fault."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"catalog file {file} cannot be read ({exc.strerror}): check the --catalog path") from exc
    try:
        raw = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise DataError(f"catalog file {file} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {first}") from exc
    if isinstance(raw, dict) and "models" in raw:
        raw = raw["models"]
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"catalog file {file} must map model names to their sizes (params_b, layers, hidden, prices)")
    specs: dict[str, ModelSpec] = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise DataError(f"catalog file {file}: model {name!r} must map to fields such as params_b")
        secret = next((k for k in fields if any(h in str(k).lower() for h in _SECRET_HINTS)), None)
        if secret is not None:
            raise DataError(
                f"catalog file {file}: model {name!r} has field {secret!r}; catalogs never hold secrets: "
                "set the provider's API key in its environment variable instead"
            )
        try:
            specs[str(name)] = ModelSpec(name=str(name), **fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error.get("loc", ()))
            raise DataError(f"catalog file {file}: model {name!r} field {where!r}: {error.get('msg')}") from exc
    return specs
