"""The gateway's call to the model replicas, through the loss of a replica.

A replica killed mid-request (its process SIGKILLed, its node lost, out of memory) takes the requests
it was computing with it: Serve's HTTP proxy answers those with 500, which tells a client nothing.
The gateway instead calls the model deployment through a ``DeploymentHandle`` and, when the replica
that held a request died, sends the request once more:

* With two or more model replicas (``ServeConfig.num_replicas``) the retry goes to a live one. Serve's
  router drops a replica from its set as soon as a call to it fails with ``ActorDiedError``
  (``Router._handle_actor_died_error`` in ``ray/serve/_private/router.py``), so the retry is not sent
  back to the dead one. Retrying is safe because generation is idempotent: the gateway fixes every
  request's seed before it forwards it (``validate`` draws one when the client gave none), so the
  retried request draws the same noise as the lost one (the same images up to the float rounding
  of another batch: the retry may be merged with other requests, and kernels differ by batch size).
* With one replica there is no live replica to retry on until Serve has restarted it (measured:
  ~16 s), so the request is answered ``503 Service Unavailable`` with ``Retry-After``: the client
  knows the failure is transient and when to come back. Requests that arrive while the replica is
  down wait in Serve's router for the restarted replica, as before.

Every model call is bounded (``ServeConfig.request_timeout_s``): a replica that hangs costs the
client a ``504 Gateway Timeout`` (the call is cancelled), not a connection held forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException
from ray.exceptions import ActorUnavailableError, RayActorError

from services.serving.generator import GenerationItem

__all__ = ["REPLICA_LOST", "forward_with_failover", "unavailable"]

log = logging.getLogger(__name__)

# What a call raises when the replica running it went away (ActorDiedError is a RayActorError).
REPLICA_LOST: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)


def unavailable(retry_after_s: int, why: str) -> HTTPException:
    """503 with ``Retry-After`` (RFC 9110 section 10.2.3, in seconds)."""
    return HTTPException(
        status_code=503,
        detail=f"no model replica could serve this request ({why}); retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


async def forward_with_failover(
    handle: Any, item: GenerationItem, *, retries: int, retry_after_s: int, timeout_s: float = 300.0
) -> dict:
    """The model's reply to ``item``, sent through ``handle`` (routed to a replica holding its
    checkpoint) and sent ``retries`` more times if the replica computing it dies.

    Returns:
        the model's reply (``images``, ``batch_requests``, ``queue_ms``, ``compute_ms`` or ``error``)
        with ``attempts``: how many replicas it took (1 when nothing failed).

    Raises:
        HTTPException: 503 with ``Retry-After`` when every attempt lost its replica; 504 when a call
        outlasts ``timeout_s`` (it is not retried: the replica is alive, only slow).
    """
    routed = handle.options(multiplexed_model_id=item.checkpoint)
    for attempt in range(1, retries + 2):
        response = routed.generate_item.remote(item)
        try:
            reply = await asyncio.wait_for(_result(response), timeout_s)
        except TimeoutError:
            response.cancel()
            raise HTTPException(status_code=504, detail=f"the model did not answer within {timeout_s:.0f} s") from None
        except REPLICA_LOST as err:
            log.warning("model replica lost during a request (attempt %d of %d): %s", attempt, retries + 1, err)
            continue
        return {**reply, "attempts": attempt}
    raise unavailable(retry_after_s, "its model replica was lost" + (" and so was the retry's" if retries else ""))


async def _result(response: Any) -> Any:
    return await response
