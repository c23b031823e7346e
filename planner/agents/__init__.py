"""Planner agents: strategies whose proposals come from a planner LLM, run as langgraph graphs."""
