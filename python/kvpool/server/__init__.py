"""``kvpool serve``: an OpenAI- and Anthropic-compatible HTTP server over the agent store.

Modules: :mod:`.serve` (startup, shutdown), :mod:`.app` (routes, streaming), :mod:`.loop`
(the engine-loop thread), :mod:`.openai_api` / :mod:`.anthropic_api` (each API's shapes),
:mod:`.params` (shared parsing and limits), :mod:`.sessions`, :mod:`.metrics`,
:mod:`.errors`. Needs the ``serve`` extra (starlette, uvicorn, prometheus-client).
"""
