"""POST /recommend (the logic is service/recommender.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service import recommender
from service.admission import InferenceRoute
from service.api.deps import State
from service.api.json_body import UniqueKeysRoute
from service.schemas import RecommendRequest, RecommendResponse, error_responses


class RecommendRoute(UniqueKeysRoute, InferenceRoute):
    """InferenceRoute, with a JSON body whose keys must be unique (service/api/json_body.py)."""


router = APIRouter(route_class=RecommendRoute)


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=error_responses(408, 413, 422, 429, 500, 503, 504),
    summary="Top-k items for a user (Redis history) or for a given history",
)
async def recommend(body: RecommendRequest, state: State) -> Response:
    answer = await recommender.recommend(state, body)
    return Response(
        answer.content, media_type="application/json", headers={"Server-Timing": answer.server_timing()}
    )
