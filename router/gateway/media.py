"""Image inputs of chat messages: OpenAI `image_url` content parts to checked image bytes.

Owns the three URL forms a part may carry: `data:image/...;base64,...` (decoded strictly),
`file://` paths (only under `--allowed-local-media-path`, symlinks resolved before the
check) and `http(s)://` (fetched with a deadline and a byte limit; where the network is
unreachable the request fails with a clear 400). Every image is checked with pillow
(decodable, within the pixel limit) and hashed (sha256 of its bytes: the key of the
encoder's embedding cache and of the prefix cache's image spans). Every bad input is an
`ApiError` 400 in the OpenAI format naming the offending part, never a 5xx.

`template_content` turns a message's parts into what chat templates read
(`{"type": "text"}` / `{"type": "image"}`), so the model's own template places its image
placeholder. The router never imports the services: the image processor runs in the
encoder or the worker, not here.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import io
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from baton.router.gateway.errors import ApiError


@dataclass(frozen=True)
class MediaConfig:
    """What image inputs a gateway takes."""

    max_images_per_request: int = 8
    """Images one request may carry."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image, in bytes."""
    max_image_pixels: int = 4096 * 4096
    """Largest decoded image, width x height."""
    fetch_timeout_s: float = 10.0
    """Deadline of one http(s) image fetch."""
    allowed_local_media_path: str = ""
    """A folder whose files `file://` URLs may name; empty: no local files."""


@dataclass(frozen=True)
class ImageInput:
    """One checked image of a request."""

    data: bytes
    """The encoded image file, as received."""
    content_hash: str
    """sha256 hex digest of `data`."""
    width: int
    height: int


def image_urls(messages: Sequence[Any]) -> list[tuple[str, str]]:
    """(url, param path) of every image part of the messages, in order."""
    found = []
    for i, message in enumerate(messages):
        content = _get(message, "content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if _get(part, "type") != "image_url":
                continue
            image_url = _get(part, "image_url")
            url = image_url if isinstance(image_url, str) else _get(image_url, "url")
            param = f"messages.{i}.content.{j}.image_url"
            if not isinstance(url, str) or not url:
                raise ApiError(400, "an image_url part needs a url", param=param)
            found.append((url, param))
    return found


def template_content(content: Any) -> Any:
    """A message's content for a chat template: text stays text, each image part becomes {"type": "image"}."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = _get(part, "type")
        if kind == "text":
            out.append({"type": "text", "text": _get(part, "text") or ""})
        elif kind == "image_url":
            out.append({"type": "image"})
        else:
            raise ApiError(400, f"content part type {kind!r} is not supported; text and image_url parts are")
    return out


class MediaLoader:
    """Loads and checks a request's images under a `MediaConfig`."""

    def __init__(self, config: MediaConfig) -> None:
        self.config = config
        root = config.allowed_local_media_path
        self._local_root = Path(root).resolve() if root else None

    async def load_messages(self, messages: Sequence[Any]) -> list[ImageInput]:
        """Every image of the messages, in order; ApiError 400 for a bad one or too many."""
        urls = image_urls(messages)
        if len(urls) > self.config.max_images_per_request:
            raise ApiError(400, f"the request has {len(urls)} images; at most "
                                f"{self.config.max_images_per_request} are allowed", param="messages")
        return [await self.load(url, param) for url, param in urls]

    async def load(self, url: str, param: str = "image_url") -> ImageInput:
        """One image from its URL, checked."""
        if url.startswith("data:"):
            data = self._from_data_url(url, param)
        elif url.startswith("file://"):
            data = await asyncio.to_thread(self._from_file, url[len("file://"):], param)
        elif url.startswith(("http://", "https://")):
            data = await asyncio.to_thread(self._from_http, url, param)
        else:
            raise ApiError(400, "image urls must be data:, file:// or http(s):// URLs", param=param)
        return self.check(data, param)

    def check(self, data: bytes, param: str = "image_url") -> ImageInput:
        """Size, decodability and pixel count of encoded image bytes."""
        if len(data) > self.config.max_image_bytes:
            raise ApiError(400, f"the image has {len(data)} bytes; at most {self.config.max_image_bytes} are "
                                f"allowed", param=param)
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.config.max_image_pixels:
                    raise ApiError(400, f"the image has {width}x{height} pixels; at most "
                                        f"{self.config.max_image_pixels} are allowed", param=param)
                image.load()
        except ApiError:
            raise
        except Exception as exc:  # pillow raises many types for bad data
            raise ApiError(400, f"the image cannot be decoded: {exc}", param=param) from None
        return ImageInput(data, hashlib.sha256(data).hexdigest(), width, height)

    def _from_data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64") or not header[len("data:"):].startswith("image/"):
            raise ApiError(400, "a data URL image must be data:image/<type>;base64,<data>", param=param)
        if len(payload) > self.config.max_image_bytes * 4 // 3 + 4:
            raise ApiError(400, f"the image is over {self.config.max_image_bytes} bytes", param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data URL's base64 payload is not valid base64", param=param) from None

    def _from_file(self, path: str, param: str) -> bytes:
        if self._local_root is None:
            raise ApiError(400, "local file images are not allowed (--allowed-local-media-path is not set)",
                           param=param)
        target = Path(path).resolve()
        if os.path.commonpath([str(target), str(self._local_root)]) != str(self._local_root):
            raise ApiError(400, f"local images must be under the allowed media path {self._local_root}",
                           param=param)
        try:
            size = target.stat().st_size
            if size > self.config.max_image_bytes:
                raise ApiError(400, f"the image has {size} bytes; at most {self.config.max_image_bytes} are "
                                    f"allowed", param=param)
            return target.read_bytes()
        except OSError as exc:
            raise ApiError(400, f"the local image cannot be read: {exc.strerror or exc}", param=param) from None

    def _from_http(self, url: str, param: str) -> bytes:
        limit = self.config.max_image_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.config.fetch_timeout_s) as response:  # noqa: S310
                data = response.read(limit + 1)
        except Exception as exc:  # DNS, refused, timeout, HTTP error status
            raise ApiError(400, f"the image at {url} could not be fetched: {exc}", param=param) from None
        if len(data) > limit:
            raise ApiError(400, f"the image at {url} is over {limit} bytes", param=param)
        return data


def _get(obj: Any, name: str) -> Optional[Any]:
    """A field of a pydantic model (extra fields included) or a dict."""
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


VISION_ARCHITECTURES = ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
"""The vision-language architectures the workers serve (services/engine/models/vlm.py)."""


@functools.lru_cache(maxsize=8)
def takes_images(model_folder: str) -> bool:
    """True when the model folder's config.json names a vision-language architecture."""
    try:
        config = json.loads((Path(model_folder) / "config.json").read_text()) if model_folder else {}
    except (OSError, ValueError):
        return False
    return any(a in VISION_ARCHITECTURES for a in config.get("architectures") or [])


def has_images(content: Any) -> bool:
    """True when a message's content has an image part."""
    return isinstance(content, list) and any(_get(part, "type") == "image_url" for part in content)


def media_config(router_config: Any) -> MediaConfig:
    """The gateway's image limits from the router's flags."""
    return MediaConfig(max_images_per_request=router_config.max_images_per_request,
                       max_image_bytes=router_config.max_image_bytes,
                       fetch_timeout_s=router_config.image_fetch_timeout_s,
                       allowed_local_media_path=router_config.allowed_local_media_path)


async def request_images(core: Any, messages: Sequence[Any]) -> list[tuple[bytes, str]]:
    """(bytes, sha256 hex) of a chat request's images, checked (400s); NO_WORKER (503) when
    encoders are configured and none is available."""
    if not any(has_images(_get(m, "content")) for m in messages):
        return []
    if not takes_images(core.config.model):
        raise ApiError(400, f"the served model {core.model_name!r} takes no image inputs", param="messages")
    images = await MediaLoader(media_config(core.config)).load_messages(messages)
    encoders = getattr(core, "encoders", None)
    if encoders:
        encoders.check_available()
    return [(image.data, image.content_hash) for image in images]
