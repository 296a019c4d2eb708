"""The web service: API unit tests (TestClient), a real uvicorn server on loopback, a real browser.

The browser test needs Chromium and its driver from the Debian packages (`apt-get install
chromium chromium-driver`, done by .ci/run). Without them it FAILS rather than skips, so a
machine that cannot run it never passes silently.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # test extra
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.service.http import ServeSettings, create_app
from delf_retrieval.service.recognizer import Recognizer
from delf_retrieval.tasks.build_index import build_index

pytest.importorskip("fastapi", reason="the serve extra: pip install '.[serve]'")  # CI requires it
from fastapi.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.slow  # builds an index, starts a server and a browser

NAMES = {"1000": "astronaut", "1001": "coffee", "1002": "chelsea"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    build_demo_dataset(
        root,
        seed=7,
        landmarks=tuple(NAMES.values()),
        nonlandmark_queries=("grass",),
        nonlandmark_set=("gravel", "moon", "page"),
        image_size=320,
    )
    return root


@pytest.fixture(scope="module")
def index(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(dataset, "opencv-sift", out, progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def recognizer(index):
    return Recognizer.load(index)


@pytest.fixture(scope="module")
def client(recognizer):
    return TestClient(create_app(recognizer, ServeSettings(max_upload_bytes=300_000, concurrency=2)))


@pytest.fixture(scope="module")
def photos(dataset):
    """(path, landmark id) of the landmark queries."""
    solution = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False)
    return [(kaggle_image_path(dataset / "test", q), t) for q, t in zip(solution.id, solution.landmarks, strict=True) if t]


def _jpeg_bytes(size: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # noise does not compress: bytes ~ 3 * size^2
    return buffer.getvalue()


# --------------------------------------------------------------------------- API unit tests
def test_health_page_and_docs(client, recognizer):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["train_images"] == 9 and health["landmarks"] == 3
    assert health["max_upload_bytes"] == 300_000 and health["concurrency"] == 2
    page = client.get("/")
    assert page.status_code == 200 and 'id="photo"' in page.text and "text/html" in page.headers["content-type"]
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/thumbnails/{image_id}"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_predict_multipart_and_raw_body_give_the_recognizers_answer(client, recognizer, photos):
    path, truth = photos[0]
    expected = recognizer.predict(path).to_dict()
    for response in (
        client.post("/predict", files={"file": ("photo.jpg", path.read_bytes(), "image/jpeg")}),
        client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"}),
    ):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["landmark_id"] == truth and answer["name"] == NAMES[truth] and answer["is_landmark"]
        assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-9)
        assert answer["neighbours"] == expected["neighbours"]


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "empty file"),
        ({"files": {"file": ("a.jpg", b"hello, not a photo", "image/jpeg")}}, 400, "not a readable image"),
        ({"files": {"file": ("a.txt", b"hello", "text/plain")}}, 415, "text/plain"),
        ({"json": {"photo": "a.jpg"}}, 415, "multipart/form-data"),
        ({"files": {"other": ("a.jpg", b"x", "image/jpeg")}}, 422, "no file field"),
        ({"files": {"file": ("big.png", _jpeg_bytes(400), "image/png")}}, 413, "limit is 300000 bytes"),
        # Over the limit but within the multipart allowance of the Content-Length check: read and refused.
        ({"files": {"file": ("big.png", _jpeg_bytes(330), "image/png")}}, 413, "limit is 300000 bytes"),
        ({"content": _jpeg_bytes(400), "headers": {"content-type": "image/png"}}, 413, "too large"),
    ],
)
def test_bad_input_gets_a_4xx_json_message(client, photos, request_args, status, message):
    response = client.post("/predict", **request_args)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert client.post("/predict", files={"file": ("p.jpg", photos[0][0].read_bytes(), "image/jpeg")}).status_code == 200


def test_thumbnails_come_from_the_index(client, recognizer):
    image_id = recognizer.ids[0]
    response = client.get(f"/thumbnails/{image_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == 256
    missing = client.get("/thumbnails/not-an-id")
    assert missing.status_code == 404 and "not-an-id" in missing.json()["detail"]


# --------------------------------------------------------------------------- real server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(index):
    """`delf-retrieval serve` in a subprocess on a free loopback port; yields its base URL."""
    port = _free_port()
    command = [sys.executable, "-m", "delf_retrieval.cli.main", "serve", str(index), "--port", str(port), "--concurrency", "2"]
    command += ["--max-upload-mb", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the server did not answer /health within 60 s")
        time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_real_server_answers_good_bad_and_concurrent_requests(server, recognizer, photos):
    def post(path):
        with open(path, "rb") as handle:
            return httpx.post(f"{server}/predict", files={"file": (Path(path).name, handle, "image/jpeg")}, timeout=60)

    path, truth = photos[0]
    first = post(path)
    assert first.status_code == 200 and first.json()["landmark_id"] == truth
    bad = [
        httpx.post(f"{server}/predict", files={"file": ("x.jpg", b"not a photo", "image/jpeg")}, timeout=30),
        httpx.post(f"{server}/predict", content=b"", headers={"content-type": "image/jpeg"}, timeout=30),
        httpx.post(f"{server}/predict", content=b"x" * (2 << 20), headers={"content-type": "image/jpeg"}, timeout=30),
        httpx.post(f"{server}/predict", content=b"{}", headers={"content-type": "application/json"}, timeout=30),
    ]
    assert [r.status_code for r in bad] == [400, 400, 413, 415]
    assert all(r.json()["detail"] for r in bad)
    # Six requests from three clients at once: every answer is the one-at-a-time answer.
    work = [photos[i % len(photos)] for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda item: post(item[0]), work))
    for (photo, label), response in zip(work, answers, strict=True):
        assert response.status_code == 200
        expected = recognizer.predict(photo)
        assert response.json()["landmark_id"] == expected.landmark_id == label
        assert response.json()["confidence"] == pytest.approx(expected.confidence, abs=1e-9)
    assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"


# --------------------------------------------------------------------------- real browser
def _chrome_driver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "the browser test needs Chromium and chromedriver from the Debian packages: "
            "apt-get update && apt-get install -y chromium chromium-driver (.ci/run does this)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_browser_uploads_a_photo_and_shows_the_landmark(server, photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome_driver()
    try:
        driver.get(f"{server}/")
        path, truth = photos[1]
        driver.find_element(By.ID, "photo").send_keys(str(path))
        driver.find_element(By.ID, "submit").click()
        result = driver.find_element(By.ID, "result")
        WebDriverWait(driver, 60).until(lambda _: result.get_attribute("data-state") in ("done", "error"))
        assert result.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
        assert driver.find_element(By.ID, "landmark").text == NAMES[truth]
        assert driver.find_element(By.ID, "decision").text.startswith("landmark, ")  # "landmark, 87%"
        assert driver.find_element(By.ID, "decision").text.endswith("%")
        assert driver.find_element(By.ID, "confidence").text.endswith("%")  # the probability
        assert "score" in driver.find_element(By.ID, "score").text
        cards = driver.find_elements(By.CSS_SELECTOR, "#neighbours .card")
        assert len(cards) == 9  # NUM_TO_RERANK 10 candidates, 9 train photos
        first = cards[0].find_element(By.TAG_NAME, "img")
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return arguments[0].naturalWidth", first) > 0)
        assert NAMES[truth] in cards[0].text and "inliers" in cards[0].text
        driver.save_screenshot(str(tmp_path / "page.png"))
        # A file that is not a photo: the page shows the service's message.
        bad = tmp_path / "notes.jpg"
        bad.write_text("not a photo")
        driver.find_element(By.ID, "photo").send_keys(str(bad))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(lambda _: result.get_attribute("data-state") == "error")
        assert "not a readable image" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
