"""The embeddable client: ``from mesh import MeshClient``.

    async with MeshClient() as client:          # the local node (found through its data dir)
        async for text in client.generate("gemma3", "The capital of France is"):
            print(text, end="")

``MeshClient.embedded(data_dir)`` starts a node inside the application instead. Leaving the
loop early (``break``) or cancelling the task closes the request, and the node frees the
sessions on every stage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from mesh.errors import Error

__all__ = ["MeshClient", "ClientError"]

MAX_LINE = 16 << 20


class ClientError(Error):
    """The node refused the request or the generation failed."""


class MeshClient:
    def __init__(
        self,
        api: str | None = None,
        *,
        timeout: float = 600.0,
        token: str | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        """``api`` defaults to the node running from ``data_dir`` (default: the default data
        dir); ``token`` to ``EDGEMESH_API_TOKEN``, else that node's ``api.token`` when ``api``
        is its address (mesh.local.resolve_token)."""
        from mesh.local import resolve_api, resolve_token

        home = Path(data_dir) if data_dir is not None else None
        self.api = resolve_api(api, home)
        self.timeout = timeout
        self.token = token or resolve_token(self.api, home)
        self.last_summary: dict[str, Any] = {}
        self._session: aiohttp.ClientSession | None = None
        self._node: Any = None

    @classmethod
    async def embedded(cls, data_dir: str | Path, **config: Any) -> MeshClient:
        """Start a node in this process (``config``: NodeConfig fields) and connect to it."""
        from mesh.node import Node, NodeConfig

        node = Node(NodeConfig(data_dir=Path(data_dir), **config))
        ready = await node.start()
        client = cls(ready["api"], data_dir=data_dir)
        client._node = node
        return client

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._node is not None:
            await self._node.stop()
            self._node = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                read_bufsize=1 << 20,
                headers=headers,
            )
        return self._session

    async def models(self) -> list[dict[str, Any]]:
        async with self._http().get(f"{self.api}/v1/models") as resp:
            if resp.status != 200:
                raise ClientError(f"models: HTTP {resp.status}: {await resp.text()}")
            data: list[dict[str, Any]] = (await resp.json())["data"]
            return data

    async def peers(self) -> list[dict[str, Any]]:
        async with self._http().get(f"{self.api}/v1/peers") as resp:
            if resp.status != 200:
                raise ClientError(f"peers: HTTP {resp.status}: {await resp.text()}")
            result: list[dict[str, Any]] = await resp.json()
            return result

    async def llm_job(
        self,
        model: str,
        prompts: str,
        *,
        compare: bool = False,
        max_tokens: int = 32,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Generate for every record of the stored jsonl ``prompts`` (an object id) with
        ``model`` (name or id): the job's report, whose ``id`` is the results object.
        ``compare`` also runs the random placement baseline in the same job."""
        body = {
            "kind": "llm",
            "model": model,
            "prompts": prompts,
            "policies": ["ours", "random"] if compare else ["ours"],
            "max_tokens": max_tokens,
            "seed": seed,
        }
        async with self._http().post(f"{self.api}/v1/jobs", json=body) as resp:
            if resp.status != 200:
                raise ClientError(f"job: HTTP {resp.status}: {await resp.text()}")
            report: dict[str, Any] = await resp.json()
            return report

    async def stream(
        self, model: str, prompt: str = "", **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Raw events: one per token, then the summary (also kept in ``last_summary``)."""
        body = {
            "model": model,
            "prompt": prompt,
            **{k: v for k, v in options.items() if v is not None},
        }
        async with self._http().post(f"{self.api}/v1/generate", json=body) as resp:
            if resp.status != 200:
                raise ClientError(f"generate: HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if len(line) > MAX_LINE:
                    raise ClientError("oversized event from the node")
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    raise ClientError(f"{event.get('type', 'Error')}: {event['error']}")
                if event.get("done"):
                    self.last_summary = event
                yield event

    async def generate(
        self,
        model: str,
        prompt: str,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        speculative: bool | int = False,
        **options: Any,
    ) -> AsyncIterator[str]:
        """Text pieces as tokens arrive; greedy when ``temperature`` is 0. Without a
        ``seed`` the node draws one (the summary of :meth:`stream` gives it).
        ``speculative``: draft tokens by prompt lookup and verify them several per step
        (True: the node's default draft length; an integer: that many); the tokens are
        those of the run without it."""
        async for event in self.stream(
            model,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop or [],
            speculative=speculative or None,
            **options,
        ):
            if event.get("restart"):
                # Pieces already yielded cannot be taken back (``stream`` shows restarts).
                raise ClientError(f"generation restarted after a failed spot check: {event}")
            if "token" in event:
                yield str(event.get("text", ""))
