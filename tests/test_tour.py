"""The README as a user runs it: the tour ("## A tour"), line by line through the CLI on generated
data, and the TF Serving section: models.config, the REST body and the gRPC request sent to the
model `make demo` exports.

The tour assumes `slides/` and two labelled slide coordinates CSVs, `data/tumour.csv` and
`data/necrosis.csv` (`slide,x,y,label,split`); :func:`_tour_data` makes them: a synthetic
pyramidal TIFF with one tissue band per class (labels from the bands) and, as the new slide the
tour tiles, predicts and maps, a copy of the real `tests/fixtures/cmu-1-small-region.svs`. Every other
input of a line must be made by an earlier line, so a README edit that breaks the sequence fails here.

Each line runs as written (`shlex.split`, in-process through click's CliRunner, in a temporary
directory holding a copy of `configs/`), with only these flags appended to keep it fast (a later
flag wins over the README's): :data:`FAST` (the `tiny_test` backbone of tests/helpers/tiny.py with
random weights at 32 px instead of efficientnet_lite0 at 224 px; 4 epochs, no early stopping and 2
cross-validation folds for `train`) and `--no-progress`. The whole tour takes about 40 s on 2 cores.
"""
from __future__ import annotations

import base64
import collections
import csv
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from dfl_tf.cli import main
from dfl_tf.data.synthetic import demo_slide_image, make_pyramid_tiff, region_of
from tests.helpers import REPO as ROOT

#: Flags appended per command (tiny backbone, small input, few epochs).
FAST = {
    "extract": ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "32"],
    "train": ["--epochs", "4", "--patience", "0", "--cv-folds", "2"],
}
PROGRESS = {"extract", "train", "predict", "heatmap"}  # commands with --progress/--no-progress


def tour_lines(readme: str) -> list[str]:
    """The `dfl` lines of the README tour's code block, comments dropped."""
    section = readme.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [" ".join(shlex.split(line, comments=True)) for line in block.splitlines()]
    return [line for line in lines if line]


def _tour_data(root: Path) -> None:
    """slides/train.tiff (3 bands: tumour, stroma, lymphocytes), slides/new.svs (the real CMU-1
    region), and data/{tumour,necrosis}.csv over the bands' tiles, split by position in the band."""
    (root / "slides").mkdir()
    (root / "data").mkdir()
    image, regions = demo_slide_image(2048, 2048, margin=128, seed=0)
    make_pyramid_tiff(root / "slides" / "train.tiff", image, mpp=0.5, levels=4)
    shutil.copy(ROOT / "tests" / "fixtures" / "cmu-1-small-region.svs", root / "slides" / "new.svs")
    shutil.copytree(ROOT / "configs", root / "configs")
    rows = []
    for y in range(256, 2048 - 256 + 1, 128):
        for x in range(256, 2048 - 256 + 1, 128):
            region = region_of(regions, x, y)
            if region is None:
                continue
            where = (y - region["y0"]) / (region["y1"] - region["y0"])
            split = "train" if where < 0.5 else "val" if where < 0.75 else "test"
            rows.append((x, y, region["class"], split))
    tasks = {"tumour": lambda c: "tumour" if c == "tumour" else "normal",
             "necrosis": lambda c: "necrosis" if c == "lymphocytes" else "viable"}
    for task, label in tasks.items():
        with open(root / "data" / f"{task}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slide", "x", "y", "label", "split"])
            writer.writerows([("../slides/train.tiff", x, y, label(c), split) for x, y, c, split in rows])


def test_readme_tour_runs_as_written(tmp_path, monkeypatch):
    lines = tour_lines((ROOT / "README.md").read_text())
    assert len(lines) >= 10 and all(line.startswith("dfl ") for line in lines), lines
    _tour_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line in lines:
        argv = shlex.split(line)[1:]
        command = argv[0]
        argv += FAST.get(command, []) + (["--no-progress"] if command in PROGRESS else [])
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, f"README tour line failed: {line}\n{result.output}"
    commands = [shlex.split(line)[1] for line in lines]
    assert {"backbones", "extract", "train", "evaluate", "export", "tile", "predict", "heatmap"} <= set(commands)
    # What the tour's lines promise: a two-task model, predictions for every tile, a heatmap.
    export = json.loads(next((tmp_path / "saved_models").glob("*/1/export.json")).read_text())
    assert [h["task"] for h in export["heads"]] == ["tumour", "necrosis"]
    assert export["views"] == ["x20:rgb", "x5:rgb"] and export["parity"]["passed"]
    predicted = next(tmp_path.glob("*preds*.csv"))
    tiles = [line for line in lines if line.startswith("dfl tile")]
    tiled = list(csv.DictReader(open(shlex.split(tiles[-1])[shlex.split(tiles[-1]).index("--out") + 1])))
    rows = list(csv.DictReader(open(predicted)))
    assert len(rows) == len(tiled) > 5
    probs = np.array([[float(r["tumour_p_normal"]), float(r["tumour_p_tumour"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    maps = next(tmp_path.glob("heatmaps/*"))
    assert (maps / "predictions.csv").exists() and (maps / "necrosis.geojson").exists()
    assert json.loads((maps / "heatmap.json").read_text())["size"] == 256
    assert (next(tmp_path.glob("reports/*")) / "metrics.json").exists()


# --- The served demo: models.config, and the README's REST and gRPC requests against `make demo`'s model.

README = (ROOT / "README.md").read_text()


def _served(config_text: str) -> dict[str, str]:
    """name -> base_path of a TF Serving models.config text (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", config_text)
    entries = re.findall(r"config\s*\{(.*?\})\s*\}", text, re.S)
    return {re.search(r'name:\s*"([^"]+)"', e).group(1): re.search(r'base_path:\s*"([^"]+)"', e).group(1)
            for e in entries}


def test_models_config_serves_only_what_make_demo_exports():
    """TF Serving waits for every listed model: each must be one `make demo` writes."""
    from dfl_tf.config import load_yaml

    makefile = (ROOT / "Makefile").read_text()
    demo_config = re.search(r"^demo:.*\n\t\$\(PY\) tools/demo.py --config (\S+)", makefile, re.M).group(1)
    export_dir = Path(load_yaml(ROOT / demo_config)["export_dir"])  # saved_models/demo
    assert export_dir.parts[0] == "saved_models"
    served = _served((ROOT / "saved_models" / "models.config").read_text())
    assert served == {export_dir.name: "/models/" + Path(*export_dir.parts[1:]).as_posix()}
    # the README shows that file and sends its requests to that model
    called = set(re.findall(r"/v1/models/([\w-]+):predict", README))
    called |= set(re.findall(r'model_spec\.name[^=]*= "([\w-]+)"', README))
    assert called == set(served)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> dict[str, Path]:
    """What `make demo` exports, made by the same pipeline (dfl_tf.demo) at a small size."""
    from dfl_tf.demo import demo

    root = tmp_path_factory.mktemp("demo")
    overrides = {"data": {"width": 1600, "height": 1100}, "tile": {"size": 96},
                 "extract": {"backbone": "tiny_test", "weights": "none", "input_size": 32, "batch_size": 16},
                 "train": {"epochs": 4, "hidden": 16}}
    summary = demo(ROOT / "configs" / "demo.yaml", out=root / "out", export_dir=root / "saved_models" / "demo",
                   overrides=overrides, progress=False)
    return {"model": Path(summary["outputs"]["model"]), "slide": Path(summary["outputs"]["slide"])}


def decode_request(body: dict) -> tuple[str, dict[str, tf.Tensor]]:
    """A TF Serving REST predict body as the server decodes it: the row form (`instances`, a list of
    objects of named inputs) or the columnar form (`inputs`, name -> list); `{"b64": ...}` is a
    base64-encoded binary string."""
    def value(v):
        return base64.b64decode(v["b64"]) if isinstance(v, dict) and set(v) == {"b64"} else v

    if "instances" in body:
        columns = {k: [value(inst[k]) for inst in body["instances"]] for k in body["instances"][0]}
    else:
        columns = {k: [value(v) for v in values] for k, values in body["inputs"].items()}
    return body.get("signature_name", "serving_default"), {k: tf.constant(v) for k, v in columns.items()}


def _predict_cli(model: Path, pairs: list[tuple[bytes, bytes]], root: Path) -> np.ndarray:
    """`dfl predict` on a CSV manifest path,context_path of these (image, context) files."""
    root.mkdir()
    with open(root / "patches.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "context_path"])
        for i, (image, context) in enumerate(pairs):
            (root / f"patch{i}.png").write_bytes(image)
            (root / f"context{i}.png").write_bytes(context)
            writer.writerow([f"patch{i}.png", f"context{i}.png"])
    result = CliRunner().invoke(main, ["predict", str(model), str(root / "patches.csv"), "--out",
                                       str(root / "preds.csv"), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(root / "preds.csv")))
    columns = [k for k in rows[0] if k.startswith("head_p_")]
    return np.array([[float(r[c]) for c in columns] for r in rows])


def _crops(slide: Path, cx: int, cy: int) -> tuple[bytes, bytes]:
    """An x20 patch (96 px) and its x5 context (384 px, the same centre) cut from a slide, as PNG."""
    from PIL import Image

    from dfl_tf.data.slides import open_slide

    out = []
    with open_slide(str(slide)) as reader:
        for side in (96, 384):
            buffer = io.BytesIO()
            Image.fromarray(reader.read_region_at_mpp(cx, cy, reader.mpp, side)).save(buffer, format="PNG")
            out.append(buffer.getvalue())
    return out[0], out[1]


def test_readme_rest_requests_equal_dfl_predict(demo_model, tmp_path):
    """The README's JSON body, and the body its script builds from patch.png and context.png, decoded
    as TF Serving decodes them (row and columnar form) and sent to the demo export's signature,
    give `dfl predict`'s probabilities for the same files."""
    shown = json.loads(README.split("<!-- rest-example -->")[1].split("```json")[1].split("```")[0])
    script = re.search(r"python - <<'PY' > body.json\n(.*?\n)PY\n", README, re.S).group(1)
    patch, context = _crops(demo_model["slide"], 700, 500)
    (tmp_path / "patch.png").write_bytes(patch)
    (tmp_path / "context.png").write_bytes(context)
    built = json.loads(subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                                      text=True, check=True).stdout)
    signatures = tf.saved_model.load(str(demo_model["model"])).signatures
    assert set(signatures["serving_default"].structured_input_signature[1]) == {"image_bytes", "context_bytes"}
    for n, body in enumerate((shown, built)):
        assert set(body["instances"][0]) == {"image_bytes", "context_bytes"}
        columnar = {"signature_name": body["signature_name"],
                    "inputs": {k: [inst[k] for inst in body["instances"]] for k in body["instances"][0]}}
        name, inputs = decode_request(body)
        served = signatures[name](**inputs)["head_probabilities"].numpy()
        name2, inputs2 = decode_request(columnar)
        np.testing.assert_array_equal(signatures[name2](**inputs2)["head_probabilities"].numpy(), served)
        pairs = list(zip(inputs["image_bytes"].numpy(), inputs["context_bytes"].numpy()))
        expected = _predict_cli(demo_model["model"], pairs, tmp_path / f"predict{n}")
        assert served.shape == expected.shape == (len(body["instances"]), 3)
        np.testing.assert_allclose(served, expected, atol=1e-5)
    assert built["instances"][0]["image_bytes"]["b64"] == base64.b64encode(patch).decode()


def test_readme_grpc_example_calls_the_demo_signature(demo_model, tmp_path, monkeypatch):
    """The README's gRPC snippet, run against a stand-in for tensorflow-serving-api (not installed
    here) that does what TF Serving does with a PredictRequest: tensors from the protos, the named
    model's signature called with them, outputs back as protos."""
    after = re.split(r"gRPC with\s+`tensorflow-serving-api`:", README)[1]
    snippet = after.split("```python\n", 1)[1].split("```")[0]
    signatures = tf.saved_model.load(str(demo_model["model"])).signatures
    served: dict[str, Path] = {"demo": demo_model["model"]}

    class Spec:
        name = signature_name = ""

    class PredictRequest:
        def __init__(self):
            self.model_spec, self.inputs = Spec(), collections.defaultdict(TensorProtoSlot)

    class TensorProtoSlot:
        def CopyFrom(self, proto):  # noqa: N802 - the protobuf method name
            self.proto = proto

    class Response:
        def __init__(self, outputs):
            self.outputs = {k: tf.make_tensor_proto(v.numpy()) for k, v in outputs.items()}

    class Stub:
        def __init__(self, channel):
            self.channel = channel

        def Predict(self, request, timeout):  # noqa: N802
            assert request.model_spec.name in served, request.model_spec.name
            inputs = {k: tf.constant(tf.make_ndarray(v.proto)) for k, v in request.inputs.items()}
            return Response(signatures[request.model_spec.signature_name](**inputs))

    apis = types.ModuleType("tensorflow_serving.apis")
    apis.predict_pb2 = types.SimpleNamespace(PredictRequest=PredictRequest)
    apis.prediction_service_pb2_grpc = types.SimpleNamespace(PredictionServiceStub=Stub)
    monkeypatch.setitem(sys.modules, "tensorflow_serving", types.ModuleType("tensorflow_serving"))
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", apis)
    monkeypatch.setitem(sys.modules, "grpc", types.SimpleNamespace(insecure_channel=lambda target: target))
    patch, context = _crops(demo_model["slide"], 400, 600)
    (tmp_path / "patch.png").write_bytes(patch)
    (tmp_path / "context.png").write_bytes(context)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md gRPC example", "exec"), scope)
    expected = _predict_cli(demo_model["model"], [(patch, context)], tmp_path / "predict")
    np.testing.assert_allclose(scope["probabilities"], expected, atol=1e-5)
    assert set(scope["request"].inputs) == {"image_bytes", "context_bytes"}
