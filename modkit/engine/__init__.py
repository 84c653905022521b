"""The in-process engine: requests, output processing, and the offline LLM API."""
