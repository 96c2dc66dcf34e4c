"""``reward.scorers[].server``: a scorer reached on a reward server (``services.rewards.server``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.config.base import Section

__all__ = ["RewardServerRef"]


class RewardServerRef(Section):
    """Where a scorer runs when it is not built in the scorer actor: a reward server
    (``services.rewards.server``), reached by a Ray Serve handle inside the cluster (``app``) or over HTTP
    (``url``). The wire format is JSON with base64 PNG images, never pickle (``services.rewards.wire``)."""

    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="the server's base URL over HTTP, e.g. http://host:8000/pickscore",
    )
    app: str | None = Field(default=None, min_length=1, description="the Serve application's name, reached by handle")
    deployment: str = Field(default="RewardScorer", min_length=1, description="the deployment's name inside the app")
    api_key_env: str | None = Field(
        default="NORMGUARD_REWARD_KEY",
        description="environment variable holding the bearer token sent over HTTP (null: none sent); the key "
        "itself never sits in a config file",
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="per request: a slower answer is an error naming the scorer"
    )
    connect_retries: int = Field(
        default=3,
        ge=0,
        description="tries again while no replica answers (refused connection, 502/503/504, a replica that died "
        "in the call), with exponential backoff: bounded waiting, logged; other errors go to reward.retries",
    )
    backoff_s: float = Field(default=0.5, ge=0, description="first wait between those tries (doubles each time)")
    max_reply_bytes: int = Field(default=1 << 20, ge=1024, description="a longer reply is refused unread")
    images_per_request: int = Field(
        default=32, ge=1, description="images per request (a group-wise scorer: all in one)"
    )
    concurrency: int = Field(default=4, ge=1, description="requests in flight at once per scorer call")
    groupwise: bool = Field(default=False, description="the served scorer is group-wise (sent whole prompt groups)")

    @model_validator(mode="after")
    def _one_address(self) -> RewardServerRef:
        if (self.url is None) == (self.app is None):
            raise ValueError("reward server: give exactly one of url (over HTTP) or app (a Serve handle)")
        return self
