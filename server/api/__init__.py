"""The `/v1` HTTP API: one router module per resource.

`create_app` includes the `router` of every module listed in `ROUTER_MODULES`
(import paths, loaded when the app is built). Another part adds its API by
appending its module here.
"""

ROUTER_MODULES: list[str] = [
    "facefed.server.api.health",
    "facefed.server.api.subjects",
    "facefed.server.api.matching",
    "facefed.server.api.keys",
    "facefed.server.api.receipts",
    "facefed.server.api.encrypted",
    "facefed.server.api.admin",
    "facefed.server.federated.api",
]
