"""`smolforge serve`: an OpenAI-compatible HTTP server with continuous batching.

`smolforge.serve.app` (FastAPI, the `serve` extra) holds the app; `protocol`, `replies` and
`tools` are plain Python (request models, response bodies, tool-call parsing); `cli` registers
the command without importing FastAPI.
"""
