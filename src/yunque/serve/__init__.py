"""The OpenAI-compatible server: protocol.py (the API's shapes), models.py (several models, loaded on demand),
app.py (the FastAPI app), static/ (the chat page)."""
