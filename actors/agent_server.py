"""An OpenAI-compatible HTTP endpoint for agents in other processes (or written against the `openai` package).

Each episode gets a base URL of its own, `http://HOST:PORT/episodes/<name>/v1`; `POST .../chat/completions` and
`POST .../completions` go to that episode's AgentClient, so a completion made over HTTP is recorded exactly as one
made in process (token-in/token-out, loss mask, versions, limits). The server runs in the episodes' event loop
(asyncio streams, HTTP/1.1 with keep-alive, JSON bodies); streaming is not offered. Errors answer in the API's
shape, {"error": {"message", "type"}}: 404 for an unknown episode or path, 400 for a bad body or an episode
limit (which also ends the episode), 500 for anything else.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

from actors.agent_runtime import AgentClient, EpisodeLimit
from areal_async.agents.workflows import assistant_message

_STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
_CHAT_KEYS = {"messages", "tools", "temperature", "max_tokens", "max_completion_tokens", "top_p", "model", "n",
              "tool_choice", "stream"}


class AgentServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.clients: dict[str, AgentClient] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Closes the kept-alive connections (their handlers end on the closed stream), then the server."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            deadline = time.monotonic() + 1.0
            while self._connections and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            await self._server.wait_closed()

    def base_url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/episodes/{name}/v1"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while request := await _read_request(reader):
                status, payload = await self._answer(*request)
                body = json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._connections.discard(writer)

    async def _answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        parts = path.split("?")[0].strip("/").split("/")
        if method != "POST" or len(parts) < 4 or parts[0] != "episodes" or parts[2] != "v1":
            return _error(404, f"no route {method} {path}", "not_found")
        client = self.clients.get(parts[1])
        if client is None:
            return _error(404, f"no episode {parts[1]!r} (it has ended, or never began)", "not_found")
        try:
            request = json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            return _error(400, f"the body is not JSON: {error.msg}", "invalid_request_error")
        if not isinstance(request, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        try:
            if parts[3:] == ["chat", "completions"]:
                return 200, _chat_json(await client.chat.completions.create(**_chat_arguments(request)))
            if parts[3:] == ["completions"]:
                return 200, _completion_json(await client.completions.create(**_completion_arguments(request)))
        except EpisodeLimit as limit:
            return _error(400, str(limit), "episode_limit")
        except (ValueError, TypeError) as error:
            return _error(400, str(error), "invalid_request_error")
        except Exception as error:  # noqa: BLE001 - the agent sees it; the server goes on
            return _error(500, f"{type(error).__name__}: {error}", "server_error")
        return _error(404, f"no route {method} {path}", "not_found")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """(method, path, body) of the next request on the connection, or None when the peer closed it."""
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, path, await reader.readexactly(length)


def _error(status: int, message: str, kind: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind}}


def _chat_arguments(request: dict) -> dict:
    unknown = sorted(set(request) - _CHAT_KEYS)
    if unknown:
        raise ValueError(f"unsupported fields {unknown}")
    if request.get("stream"):
        raise ValueError("streaming is not supported")
    if request.get("n", 1) != 1:
        raise ValueError("n must be 1 (one episode, one completion at a time)")
    if request.get("tool_choice", "auto") != "auto":
        raise ValueError('tool_choice must be "auto": the model decides whether to call a tool')
    if not isinstance(request.get("messages"), list):
        raise ValueError('"messages" must be a list')
    return {"messages": request["messages"], "tools": request.get("tools"), "temperature": request.get("temperature"),
            "max_tokens": request.get("max_completion_tokens", request.get("max_tokens")), "top_p": request.get("top_p")}


def _completion_arguments(request: dict) -> dict:
    prompt = request.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
        raise ValueError('"prompt" must be a string or a list of token ids')
    return {"prompt": prompt, "temperature": request.get("temperature"), "max_tokens": request.get("max_tokens"),
            "top_p": request.get("top_p")}


def _chat_json(completion: SimpleNamespace) -> dict:
    choice = completion.choices[0]
    return {"id": completion.id, "object": "chat.completion", "created": int(time.time()), "model": "policy",
            "choices": [{"index": 0, "finish_reason": choice.finish_reason,
                         "message": assistant_message(choice.message)}]}


def _completion_json(completion: SimpleNamespace) -> dict:
    choice = completion.choices[0]
    return {"id": completion.id, "object": "text_completion", "created": int(time.time()), "model": "policy",
            "choices": [{"index": 0, "text": choice.text, "finish_reason": choice.finish_reason, "logprobs": None}]}
