"""orders 1.0: a package that uses another package's Python code.

`from inventory.db import STOCK` resolves to the version of inventory that was active when this
version loaded (inventory exports `inventory.db` in its manifest). When inventory is upgraded or
rolled back, orders is loaded again bound to the new inventory and both switch in one step.
"""

from inventory.db import STOCK
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "1.0"


async def catalogue(request):
    return JSONResponse({"version": VERSION, "skus": [sku for sku, _ in STOCK]})


app = Starlette(routes=[Route("/", catalogue)])
