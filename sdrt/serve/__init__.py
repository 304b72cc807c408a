"""``sdrt serve``: an HTTP service over the Pipeline (A1111 ``/sdapi/v1`` subset, OpenAI images, async jobs
with Server-Sent Events, a web page, health and Prometheus metrics), optionally scaled out on Ray Serve.

Nothing here is imported by ``import sdrt`` or ``sdrt.cli``; the ``serve`` extra (fastapi, uvicorn,
prometheus-client) is needed only when these modules are imported. Layout: ``executor`` (the seam:
GenRequest, GenResult, Executor, LocalExecutor), ``jobs`` (JobQueue), ``app`` (create_app), one module
per API (``a1111``, ``openai_api``, ``jobs_api``), ``auth``, ``limits``, ``metrics``, ``cli``.
"""
