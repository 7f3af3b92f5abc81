"""nqserve: an OpenAI-compatible HTTP server over the runtime (`pip install 'nanoquant[serve]'`).

    nqserve model.nq [--host 127.0.0.1] [--port 8080] [--ctx N] [--threads T] [--backend auto] [--parallel N]
                     [--api-key KEY]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events with
`stream: true`), GET /health. Requests in flight share decoding steps (continuous batching, engine.py): the next
token of every active sequence comes from one batched pass over the weights. The runtime never imports this package.
"""
