"""Image inputs at the gateway: data URLs, local files under the allowed path, http(s) without a
network, and every bad image a 400 naming its part (router/gateway/media.py)."""
from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from baton.router.gateway.errors import ApiError
from baton.router.gateway.media import MediaConfig, MediaLoader, image_urls, template_content
from tests.helpers.tiny_models import tiny_image

PNG = tiny_image(7, 30, 20)


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def message(*urls: str, text: str = "what is it?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


def load(loader: MediaLoader, messages: list) -> list:
    return asyncio.run(loader.load_messages(messages))


def rejected(loader: MediaLoader, messages: list) -> ApiError:
    with pytest.raises(ApiError) as info:
        load(loader, messages)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


def test_data_url_images_load_in_order_with_their_hash_and_size():
    other = tiny_image(8, 16, 16, fmt="JPEG")
    images = load(MediaLoader(MediaConfig()), [message(data_url(PNG)), message(data_url(other, "jpeg"))])
    assert [(i.width, i.height) for i in images] == [(30, 20), (16, 16)]
    assert images[0].data == PNG and images[0].content_hash == hashlib.sha256(PNG).hexdigest()
    assert images[1].content_hash != images[0].content_hash


def test_template_content_keeps_text_and_marks_images():
    parts = message(data_url(PNG))["content"]
    assert template_content(parts) == [{"type": "text", "text": "what is it?"}, {"type": "image"}]
    assert template_content("plain") == "plain"


@pytest.mark.parametrize("url, needle", [
    ("data:image/png;base64,@@@not-base64", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "data:image"),
    (data_url(b"definitely not an image"), "decoded"),
    ("ftp://example.com/cat.png", "data:, file://"),
    ("http://images.invalid/cat.png", "could not be fetched"),
])
def test_bad_images_are_400_naming_the_part(url, needle):
    error = rejected(MediaLoader(MediaConfig(fetch_timeout_s=2.0)), [message(data_url(PNG)), message(url)])
    assert needle in error.message and error.param == "messages.1.content.1.image_url"


def test_limits_on_count_bytes_and_pixels():
    assert "at most 2" in rejected(MediaLoader(MediaConfig(max_images_per_request=2)),
                                   [message(*[data_url(PNG)] * 3)]).message
    assert "bytes" in rejected(MediaLoader(MediaConfig(max_image_bytes=len(PNG) - 1)),
                               [message(data_url(PNG))]).message
    assert "pixels" in rejected(MediaLoader(MediaConfig(max_image_pixels=30 * 20 - 1)),
                                [message(data_url(PNG))]).message


def test_local_files_only_under_the_allowed_path(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(allowed)))
    assert load(loader, [message(f"file://{allowed}/cat.png")])[0].data == PNG
    for outside in (f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png", f"file://{allowed}/link.png"):
        assert "allowed media path" in rejected(loader, [message(outside)]).message
    assert "cannot be read" in rejected(loader, [message(f"file://{allowed}/missing.png")]).message
    assert "not allowed" in rejected(MediaLoader(MediaConfig()), [message(f"file://{allowed}/cat.png")]).message


def test_parts_without_url_and_unknown_parts_are_refused():
    with pytest.raises(ApiError, match="needs a url"):
        image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ApiError, match="not supported"):
        template_content([{"type": "input_audio"}])


def test_only_vision_language_folders_take_images(tmp_path):
    from baton.router.gateway.media import takes_images
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert takes_images(str(tmp_path / "vlm"))
    assert not takes_images(str(tmp_path / "text")) and not takes_images("") and not takes_images(str(tmp_path))
