"""The operator's settings: one pydantic-settings object, from flags and `QWEN_OPERATOR_*` env vars."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """Settings of `qwen-operator`."""

    model_config = SettingsConfigDict(env_prefix="QWEN_OPERATOR_", cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_prog_name="qwen-operator", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                  description="Namespaces to watch (comma-separated); empty: the whole cluster.")
    default_image: str = Field("ghcr.io/qwen-operator/qwen-inference:0.1.0",
                               description="Inference image when a QwenDeployment names none.")
    default_image_gpu: str | None = Field(None, description="Inference image for device gpu, when different.")
    resync_seconds: float = Field(30.0, gt=0, description="Every QwenDeployment is reconciled at least this often.")
    force_apply_seconds: float = Field(300.0, gt=0, description="Children are re-applied at least this often, "
                                       "undoing hand edits.")
    monitoring_check_seconds: float = Field(60.0, gt=0, description="How often to look for optional CRDs: the "
                                            "Prometheus Operator's, KEDA's and the InferencePool.")
    prometheus_address: str | None = Field(None, pattern=r"^https?://[^\s]+$", description="Prometheus that KEDA "
                                           "reads queue metrics from, for QwenDeployments that name none.")
    keda_http_scaler_address: str = Field("keda-add-ons-http-external-scaler.keda:9090", min_length=1,
                                          description="host:port of the KEDA HTTP add-on's external scaler.")
    keda_http_interceptor_host: str = Field("keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local",
                                            min_length=1, description="DNS name of the KEDA HTTP add-on's "
                                            "interceptor proxy Service.")
    keda_http_interceptor_port: int = Field(8080, ge=1, le=65535, description="Its port.")
    cluster_domain: str = Field("cluster.local", min_length=1, description="The cluster's DNS domain.")
    progress_seconds: float = Field(10.0, gt=0, description="While a model downloads, how often its progress in "
                                    "the status is refreshed.")
    workers: int = Field(4, ge=1, le=64, description="QwenDeployments reconciled at once.")
    watch_server_timeout: int = Field(300, ge=1, description="Seconds the API server keeps one watch open.")
    watch_client_timeout: int = Field(330, ge=1, description="Seconds before the operator drops a silent watch.")
    watch_connect_timeout: int = Field(30, ge=1, description="Seconds to connect a watch.")
    liveness_port: int = Field(8080, ge=0, le=65535, description="Port of /healthz (0: off).")
    metrics_port: int = Field(8081, ge=0, le=65535, description="Port of the operator's /metrics (0: off).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
