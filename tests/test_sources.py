"""The real loading code: `path:` and `hub:` sources build from a Hub-layout folder, offline."""

from __future__ import annotations

import shutil

from onnxforge.runtime import artifact as art
from onnxforge.runtime.text import SamplingSettings, TextGenerator

from conftest import new_project

REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_source_folder(tiny):
    return next((tiny.artifacts / "gpt2-tiny" / ".stages").glob("source-all-*")) / "model"


def recipe(source_yaml: str) -> str:
    return f"""family: gpt2
default: true
source:
{source_yaml}
validate: {{greedy_tokens: 16, eval_window: 64}}
variants:
  kv: {{}}
"""


def test_path_and_hub_sources_build_the_same_model(tiny, tmp_path):
    folder = tiny_source_folder(tiny)
    local = tmp_path / "local-gpt2"
    shutil.copytree(folder, local)
    # a Hugging Face cache holding the same files at a pinned commit
    hf = tmp_path / "hf"
    snapshot = hf / "hub" / "models--acme--tiny-gpt2" / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    project = new_project(tmp_path / "p", {
        "from-path": recipe(f"  path: {local}"),
        "from-hub": recipe(f"  hub: {{repo: acme/tiny-gpt2, revision: {REVISION}}}"),
    })
    project.doit("build", HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_HUB_OFFLINE="1")
    a_path = art.load(project.artifacts / "from-path" / "kv")
    a_hub = art.load(project.artifacts / "from-hub" / "kv")
    ref = art.load(tiny.variant("kv"))
    assert a_hub.manifest["source"]["repo"] == "acme/tiny-gpt2" and a_hub.manifest["source"]["revision"] == REVISION
    assert a_path.manifest["source"]["path"] == str(local)
    weights = {a.manifest["source"]["weights_sha256"] for a in (a_path, a_hub, ref)}
    assert len(weights) == 1, "all three load the same weights"
    s = SamplingSettings(seed=5, max_new_tokens=12)
    texts = {TextGenerator(a).generate("harbor", s).text for a in (a_path, a_hub, ref)}
    assert len(texts) == 1
    # the runtime block's prompt template comes from the recipe default
    assert a_path.runtime["prompt_template"] == "A detailed, imaginative painting of {word},"


def test_path_source_without_weights_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    project = new_project(tmp_path / "p", {"bad": recipe(f"  path: {empty}")})
    proc = project.doit("build", check=False)
    assert proc.returncode != 0
    assert f"source.path: {empty} has no weights (*.safetensors or *.bin)" in proc.stdout + proc.stderr
