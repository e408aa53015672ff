"""The ceiling: a FastAPI app that parses the same request body and returns a fixed 10-item answer.

Served exactly like the service (uvicorn, one worker, no access log), it measures what the HTTP
stack alone costs on this machine: the service cannot be faster than this.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.schemas import RecommendedItem, RecommendRequest, RecommendResponse

app = FastAPI()
_ITEMS = [RecommendedItem(item_id=str(i), score=-1.0 * i, semantic_id=[1, 2, 3, 0]) for i in range(10)]


@app.post("/noop", response_model=RecommendResponse)
async def noop(body: RecommendRequest) -> RecommendResponse:
    return RecommendResponse(user_id=body.user_id, model_version=1, items=_ITEMS, fallback=None)
