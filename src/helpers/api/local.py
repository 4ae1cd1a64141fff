"""The whole local service on one machine: the API (uvicorn), the onboarding worker, training
jobs as subprocesses, and the multi-model endpoint (Triton + router).

    with LocalApi.from_settings(settings) as api:
        admin = api.client(api.admin_key)
        key = admin.post("/v1/users", json={"user_id": "ada"}).json()["api_key"]
        ada = api.client(key)
        ada.post("/v1/photos", files=[("files", ("1.png", png_bytes, "image/png")), ...])
        ada.post("/v1/models", json={"max_train_steps": 300})

Models left REQUESTED, TRAINING or PACKAGING by a previous run are resumed at start.
"""

from __future__ import annotations

import httpx

from helpers.api.app import ApiServices, create_app
from helpers.api.auth import ADMIN_KEY_ENV, hash_key, load_admin_key
from helpers.api.generation import EndpointGenerator
from helpers.api.quotas import QuotaLimits
from helpers.domain.serving import Serving, check_serving_mode
from helpers.infra.local.asgi_thread import ThreadedServer
from helpers.services.serving import packaging_for

__all__ = ["ADMIN_KEY_ENV", "LocalApi"]


class LocalApi:
    """The local SaaS service.

    Args:
        settings (`Settings`): the local backend's settings (`api_port` is the API's port).
        admin_key (`str`, *optional*): the key that creates users; by default
            `$WORKSHOP_ADMIN_KEY`, or the one in `<work_dir>/admin.key` (made once, mode 0600;
            `helpers.api.auth.load_admin_key`). `admin_key_source` says which.
        max_loaded_models (`int`, defaults to 4): the endpoint's budget of loaded models.
        serving_mode (`str`, defaults to `"per-user"`): how the endpoint serves a user's
            model: `"per-user"` (its own Triton model) or `"shared-base"` (one resident base
            model, the user's adapter swapped in per request; `helpers.services.serving`).
        limits (`QuotaLimits`, *optional*): what tenants, addresses and the admin may use
            (`QuotaLimits()`'s defaults); counted in `settings.quotas_path`.
        port (`int`, *optional*): defaults to `settings.api_port`.
    """

    def __init__(
        self,
        settings,
        admin_key: str | None = None,
        max_loaded_models: int = 4,
        serving_mode: str = "per-user",
        limits: QuotaLimits | None = None,
        port: int | None = None,
    ) -> None:
        self.settings = settings
        if admin_key:
            self.admin_key, self.admin_key_source = admin_key, "the admin_key argument"
        else:
            self.admin_key, self.admin_key_source = load_admin_key(settings.work_dir)
        self.max_loaded_models = max_loaded_models
        self.serving_mode = check_serving_mode(serving_mode)
        self.limits = limits or QuotaLimits()
        self.port = port or settings.api_port
        self.backend = self.jobs = self.onboarding = self.endpoint = self.server = None
        self.serving: Serving | None = None
        self.resumed = 0

    @classmethod
    def from_settings(cls, settings, **kwargs) -> LocalApi:
        return cls(settings, **kwargs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalApi:
        from helpers.backend import open_backend

        self.backend = open_backend(self.settings)
        provisioned = self.backend.provision()
        store, metadata = provisioned.store, provisioned.metadata
        try:
            self.endpoint = self.backend.endpoint(max_loaded_models=self.max_loaded_models)
            self.endpoint.start()
            self.jobs = self.backend.jobs
            self.onboarding = self.backend.onboarding()
            self.resumed = self.onboarding.resume()
            self.serving = self._serving(store)
            services = ApiServices(
                settings=self.settings,
                store=store,
                metadata=metadata,
                onboarding=self.onboarding,
                generator=EndpointGenerator(
                    self.endpoint.runtime_client(), self.endpoint.name, self.serving
                ),
                admin_key_hash=hash_key(self.admin_key),
                limits=self.limits,
                counters=self.backend.quotas,
                jobs=self.jobs,
                endpoint=self.endpoint,
            )
            self.server = ThreadedServer(create_app(services), self.port, "saas-api").start()
        except BaseException:
            self.stop()
            raise
        return self

    def _serving(self, store) -> Serving:
        """What the endpoint needs for the serving mode (the shared model, in "shared-base")."""
        packaging = packaging_for(self.serving_mode)
        return packaging.serving(store, self.endpoint.prefix_uri, str(self.settings.base_model))

    def client(self, key: str | None = None, timeout: float = 300) -> httpx.Client:
        """An HTTP client for the API, authenticated with `key` when given."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def stop(self) -> None:
        """Stop the API, the worker (models in flight resume next start), jobs and endpoint."""
        if self.server is not None:
            self.server.stop()
        if self.onboarding is not None:
            self.onboarding.close()
        if self.jobs is not None:
            self.jobs.close(stop_jobs=True)
        if self.endpoint is not None:
            self.endpoint.stop()
        self.server = self.onboarding = self.jobs = self.endpoint = None

    def __enter__(self) -> LocalApi:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
