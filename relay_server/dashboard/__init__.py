"""relayd's browser dashboard and JSON API (FastAPI), imported only when [dashboard] is configured."""
