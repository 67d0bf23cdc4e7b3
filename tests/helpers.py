"""Paths and small utilities shared by the tests (tests/ is on sys.path under pytest; the repo root is
deliberately not, so that the ``kernels/`` folder can never be imported as a top-level ``kernels``)."""
import hashlib
import json
import socket
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
MODERNBERT_TOKENIZER = SHARED_DATA / "tokenizers" / "modernbert"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_shard(path, samples) -> str:
    """Write a WebDataset tar: ``samples`` is a list of (key, members) in member order; members is
    {extension: bytes} or [(extension, bytes)] (repeats allowed); key None: the extensions are whole names."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in (members.items() if isinstance(members, dict) else members):
                info = tarfile.TarInfo(ext if key is None else f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def encode_image(array, fmt: str, mode: str | None = None) -> bytes:
    """``array`` (H, W[, C]) uint8/uint16 -> encoded bytes in ``fmt`` (after ``convert(mode)`` if given)."""
    import io

    from PIL import Image

    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def image_kinds(rng) -> dict[str, tuple[str, bytes]]:
    """Every image kind seen in biomedical shards: name -> (extension, encoded bytes)."""
    import numpy as np

    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    return {
        "rgb_jpeg": ("jpg", encode_image(rgb, "JPEG")),
        "cmyk_jpeg": ("jpg", encode_image(rgb, "JPEG", "CMYK")),
        "gray_png": ("png", encode_image(gray, "PNG")),
        "gray16_png": ("png", encode_image(gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape,
                                                                                      dtype=np.uint16), "PNG")),
        "rgba_png": ("png", encode_image(np.dstack([rgb, gray]), "PNG")),
        "la_png": ("png", encode_image(gray, "PNG", "LA")),
        "palette_png": ("png", encode_image(rgb, "PNG", "P")),
        "tiny_png": ("png", encode_image(rgb[:9, :13], "PNG")),
        "huge_jpeg": ("jpg", encode_image(np.kron(rgb[:46, :65], np.ones((64, 64, 1), dtype=np.uint8)), "JPEG")),
        "exif_rotated_jpeg": ("jpg", exif_rotated_jpeg(rgb)),  # decoded as stored, as PIL and open_clip do
        "upper_case_jpeg": ("JPG", encode_image(rgb, "JPEG")),  # webdataset lower-cases extensions
    }


def exif_rotated_jpeg(array) -> bytes:
    """A JPEG whose EXIF orientation tag (6) asks viewers to turn it 90°."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


# Each broken sample: the skip kind the loaders must count it under, and its members.
def corrupt_samples(good_jpeg: bytes, good_png: bytes) -> list[tuple[str, list[tuple[str, bytes]]]]:
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.open(io.BytesIO(good_png)).convert("P").save(gif, "GIF")
    idat = good_png.index(b"IDAT") + 8  # a byte of compressed pixel data: the chunk's checksum no longer holds
    bad_crc = good_png[:idat] + bytes([good_png[idat] ^ 0xFF]) + good_png[idat + 1:]
    return [
        ("truncated_image", [("jpg", good_jpeg[: len(good_jpeg) // 2]), ("txt", b"truncated jpeg")]),
        ("truncated_image", [("png", bad_crc), ("txt", b"png whose IDAT checksum fails (PIL loads it, libpng not)")]),
        ("not_an_image", [("png", b"<html>404 not found</html>"), ("txt", b"html saved as png")]),
        ("not_an_image", [("png", gif.getvalue()), ("txt", b"a GIF named .png: PIL reads it, DALI does not")]),
        ("empty_file", [("jpg", b""), ("txt", b"zero-byte image")]),
        ("missing_caption", [("jpg", good_jpeg)]),
        ("empty_caption", [("jpg", good_jpeg), ("txt", b"  \n")]),
        ("invalid_utf8", [("jpg", good_jpeg), ("txt", b"lesion \xff\xfe size")]),
        ("two_images", [("jpg", good_jpeg), ("png", good_jpeg), ("txt", b"two images, one caption")]),
        ("duplicate_member", [("jpg", good_jpeg), ("jpg", good_jpeg), ("txt", b"the same member twice")]),
        ("space_in_name", [("jpg", good_jpeg), ("txt", b"a key with a space (written by the fixture)")]),
        ("missing_image", [("txt", b"a caption without its figure")]),
    ]


def deepspeed_config(tmp_path, stage: int, steps: int, batch: int, bf16: bool = False, accumulation: int = 1,
                     fp16_scale_power: int | None = None, offload: bool = False) -> Path:
    """The shipped ``ds_configs/zero{stage}.json`` resized for a short test run; returns its path.
    ``fp16_scale_power``: fp16 with DeepSpeed's dynamic loss scaling, starting at 2**power; ``offload``: ZeRO-Offload
    of the optimizer to the CPU, as ``ds_configs/zero1_bf16_cpu_offload.json``."""
    import json

    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    config["train_batch_size"] = batch
    config["gradient_accumulation_steps"] = accumulation
    config["bf16"]["enabled"] = bf16
    if fp16_scale_power is not None:
        config["fp16"] = {"enabled": True, "initial_scale_power": fp16_scale_power}
    config["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=min(2, steps))
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:  # partition every tensor of the tiny model, not only those above the 1e5-element default
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / (f"zero{stage}-accum{accumulation}{'-fp16' if fp16_scale_power is not None else ''}"
                       f"{'-offload' if offload else ''}.json")
    path.write_text(json.dumps(config))
    return path


def run_one_rank_script(script: str):
    """Run ``script`` (python source) in a fresh process as rank 0 of a world of one, without the launcher (the
    variables DeepSpeed reads set by hand, one thread); returns (the JSON object of its last stdout line, the
    finished process)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def launch_deepspeed(args, tmp_path, check: bool = True, env: dict | None = None, log: str = "launcher.log"):
    """Run the real ``deepspeed`` launcher from the repo root; its output goes to ``tmp_path / log``;
    ``check``: assert it exited 0; ``env``: added to the environment."""
    import os
    import subprocess
    import sys

    launcher = Path(sys.executable).parent / "deepspeed"
    assert launcher.is_file(), f"no deepspeed launcher beside {sys.executable}: make venv installs the pinned one"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([str(launcher), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / log).write_text(proc.stdout + proc.stderr)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class RunsCode:
    """An object whose unpickling writes ``marker``: code ran at load time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w')",))


def assert_same_tensors(got: dict, expected: dict) -> None:
    """The same keys, and every tensor equal bit for bit."""
    import torch

    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    different = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not different, different


def caption_batch(lengths: list[int], vocab: int = 300):
    """(ids, mask) of captions of ``lengths`` tokens, random ids in [3, vocab), right-padded with id 0."""
    import torch

    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,))
        mask[i, :n] = 1
    return ids, mask


def wandb_offline_history(run_dir) -> dict[str, list[dict]]:
    """{offline run folder: its logged rows} of the W&B offline runs under ``run_dir/wandb``, read from their
    ``.wandb`` files: a LevelDB-style log (a 7-byte ``:W&B`` header; 32 KiB blocks of records, each a CRC, a length,
    a type: full, first, middle, last) of ``wandb_internal_pb2.Record`` protobufs, whose ``history`` items are JSON."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    def raw_records(data: bytes):
        assert data[:4] == b":W&B", data[:7]
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:
                break
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full, last
                yield pending
                pending = b""

    history = {}
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        rows = []
        for raw in raw_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        history[path.parent.name] = rows
    return history


class ShardServer:
    """A local stand-in for a shard host and the Hugging Face Hub on 127.0.0.1, serving the files under ``root``.

    ``GET /PATH``: the file. As the Hub answers webdataset's ``hf://`` calls: ``GET /api/datasets/ORG/NAME[/revision/
    REV]`` (repo info) and ``GET /datasets/ORG/NAME/resolve/REV/PATH`` (a redirect to ``/cdn/PATH``, the file); for
    the model repositories of ``models`` (id -> (commit, folder)), what ``hf_hub_download`` and
    ``snapshot_download`` call:
    ``/api/models/ORG/NAME[/revision/REV]`` and ``HEAD``/``GET /ORG/NAME/resolve/REV/PATH``, with the Hub's
    ``X-Repo-Commit``, ``ETag`` and ``X-Error-Code`` headers. ``fail[PATH]``: HTTP
    statuses to answer the next requests for ``PATH`` with, one each, before the file; ``requests``: (path,
    Authorization header) of every request. ``stop()``: the server goes away (every later connection is closed
    unanswered, in whichever process connects; a closed socket would live on in forked loader workers, which
    inherit it, and time out instead); ``close()`` shuts it down."""

    def __init__(self, root):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self, head: bool = False):
                if server.down:
                    self.close_connection = True
                    return
                path = urllib.parse.unquote(self.path.split("?")[0])
                server.requests.append((path, self.headers.get("Authorization")))
                if server.fail.get(path):
                    self.send_error(server.fail[path].pop(0))
                    return
                parts = path.strip("/").split("/")
                if self.model_repo(parts, head):
                    return
                if parts[:2] == ["api", "datasets"]:
                    body = json.dumps({"id": "/".join(parts[2:4]), "sha": "0" * 40, "siblings": []}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if parts[:1] == ["datasets"] and parts[3:4] == ["resolve"]:  # to the "CDN", as the Hub redirects
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + "/".join(parts[5:]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if parts[:1] == ["cdn"]:
                    self.path = "/" + "/".join(parts[1:])
                super().do_GET()

            def do_HEAD(self):
                self.do_GET(head=True)

            def log_message(self, *args):
                pass

            def model_repo(self, parts: list[str], head: bool) -> bool:
                """Answer a call about a model repository of ``server.models``; False when it is none."""
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if repo not in server.models:
                        self.send_hub_error(404, "RepoNotFound")
                        return True
                    commit, folder = server.models[repo]
                    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
                    if parts[4:5] == ["tree"]:  # list_repo_tree, as snapshot_download lists a revision
                        body = [{"type": "file", "path": name, "size": Path(folder, name).stat().st_size,
                                 "oid": hashlib.sha1(Path(folder, name).read_bytes()).hexdigest()} for name in files]
                    else:
                        body = {"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
                    self.send_bytes(json.dumps(body).encode(), "application/json", head)
                    return True
                if len(parts) > 4 and parts[2] == "resolve" and "/".join(parts[:2]) in server.models:
                    commit, folder = server.models["/".join(parts[:2])]
                    file = Path(folder, *parts[4:])
                    if not file.is_file():
                        self.send_hub_error(404, "EntryNotFound", commit)
                        return True
                    data = file.read_bytes()
                    self.send_bytes(data, "application/octet-stream", head, {
                        "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit})
                    return True
                if len(parts) > 4 and parts[2] == "resolve":
                    self.send_hub_error(404, "RepoNotFound")
                    return True
                return False

            def send_bytes(self, body: bytes, kind: str, head: bool, headers: dict | None = None):
                self.send_response(200)
                for key, value in {"Content-Type": kind, "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def send_hub_error(self, status: int, code: str, commit: str | None = None):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.root, self.fail, self.requests, self.down = Path(root), {}, [], False
        self.models: dict[str, tuple[str, Path]] = {}  # model repo id -> (commit, folder of its files)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def urls(self, paths, scheme: str = "http") -> list[str]:
        """The URLs of local files under ``root``: ``http`` or ``hf`` (as ``hf://datasets/test/shards/PATH``)."""
        rel = [Path(p).resolve().relative_to(self.root.resolve()).as_posix() for p in paths]
        return [f"{self.url}/{r}" if scheme == "http" else f"hf://datasets/test/shards/{r}" for r in rel]

    def stop(self) -> None:
        self.down = True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def timm_vit(cfg, drop_path_rate: float = 0.0):
    """timm's ``VisionTransformer`` in ``vit_large_patch14_clip_224``'s layout (class token, pre-norm, LayerNorm
    eps 1e-5, the head as the projection) with ``cfg``'s image-tower shape."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    v = cfg.vision
    return VisionTransformer(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.layers,
                             num_heads=v.heads, mlp_ratio=v.mlp_ratio, class_token=True, global_pool="token",
                             pre_norm=True, fc_norm=False, num_classes=cfg.embed_dim,
                             norm_layer=partial(LayerNorm, eps=v.ln_eps), act_layer=v.act,
                             drop_path_rate=drop_path_rate)


def run_clis(commands: list[list[str]], cwd=REPO, env=None) -> list[dict]:
    """``python *command`` for each command, from ``cwd``, in one interpreter (tests/cli_driver.py):
    ``{"code", "stdout", "stderr"}`` of each."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_driver.py")], input=json.dumps(commands),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
