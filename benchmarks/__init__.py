"""The benchmark suite of starlette-hotdeploy (see docs/benchmarks.md).

    .venv/bin/python -m benchmarks.run [--quick]

Modules, one per scenario: `upgrade` (the same upgrade under load by four methods),
`dispatch_overhead` (in-process) and `dispatch_uvicorn` (through uvicorn and wrk), `many_swaps`
(200 swaps in a row). `loadgen` has the clients, `servers` the four ways to run and upgrade a
server, `common` the shared helpers, `setup_env` installs what the suite needs.
"""
