"""Request and response models of the simulated LMCache 0.5.6 controller API (SIMULATOR).

Field names, types and defaults exactly as in lmcache 0.5.6 (``lmcache/v1/api_server`` and
``internal_api_server/controller/*``): they decide the 422 bodies, so the simulated controller
(:mod:`kvgate_sim.controller_server`) validates with these pydantic models, like the real one.
"""

from __future__ import annotations

from pydantic import BaseModel


class QueryInstRequest(BaseModel):
    event_id: str
    ip: str


class QueryInstResponse(BaseModel):
    event_id: str
    res: str


class LookupRequest(BaseModel):
    tokens: list[int]


class ClearRequest(BaseModel):
    instance_id: str
    location: str


class PinRequest(BaseModel):
    instance_id: str
    location: str
    tokens: list[int]


class CompressRequest(BaseModel):
    instance_id: str
    method: str
    location: str
    tokens: list[int] | None = []


class MoveRequest(BaseModel):
    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[int] | None = []
    should_copy: bool | None = False


class HealthRequest(BaseModel):
    instance_id: str


class CheckFinishRequest(BaseModel):
    event_id: str


class QueryWorkerInfoRequest(BaseModel):
    instance_id: str
    worker_ids: list[int] | None = None


class EvictRequest(BaseModel):
    """kvgate extension (not in 0.5.6)."""

    tokens: list[int]
    instance_id: str
    location: str | None = None
