"""Bad input gets one clear line naming the problem and what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from onnxforge.config import RecipeError, load_recipe
from onnxforge.runtime import artifact as art
from onnxforge.runtime.text import SamplingSettings, TextGenerator
from onnxforge.sources import SourceError, hub_snapshot

from conftest import new_project, run_cli

GOOD_HEAD = """family: gpt2
source:
  random: {config: {n_layer: 1, n_head: 2, n_embd: 32}, seed: 0, tokenizer: {train_on: calibration/tokenizer-corpus.txt, vocab_size: 300}}
"""


@pytest.mark.parametrize("body, match", [
    ("family: gpt2\nvariants: [kv\n", r"malformed YAML at line \d+, column \d+: expected"),
    ("- just\n- a list\n", r"a recipe is a mapping"),
    ("family: llama\n", r"family: must be one of gpt2, sam, sam2, sd \(got 'llama'\)"),
    (GOOD_HEAD + "variants: {kv: {}}\ncolour: blue\n", r"colour: unknown key; allowed: family, description, default, budgets, source"),
    (GOOD_HEAD + "variants: {kv-fast: {}}\n", r"variants\.kv-fast: unknown key; allowed: base, kv, pruned, kv-int8"),
    (GOOD_HEAD + "variants: {kv: {}}\nvalidate: {greedy_tokens: many}\n", r"validate\.greedy_tokens: Input should be a valid integer.*'many'"),
    (GOOD_HEAD + "variants: {kv: {}}\nexport: {opset: 9}\n", r"export\.opset: Input should be greater than or equal to 14"),
    (GOOD_HEAD + "variants: {pruned: {ratio: 0}}\n", r"variants\.pruned\.ratio: Input should be greater than 0"),
    (GOOD_HEAD + "variants: {pruned: {ratio: -0.1}}\n", r"variants\.pruned\.ratio: Input should be greater than 0"),
    (GOOD_HEAD + "variants: {pruned: {ratio: 0.95}}\n", r"variants\.pruned\.ratio: Input should be less than or equal to 0\.9"),
    (GOOD_HEAD + "variants: {pruned: {ratio: 1.5}}\n", r"variants\.pruned\.ratio: Input should be less than or equal to 0\.9"),
    (GOOD_HEAD + "variants: {}\n", r"name at least one of base, kv, pruned, kv-int8"),
    ("family: gpt2\nsource: {path: a, random: {config: {}, seed: 0, tokenizer: {train_on: x, vocab_size: 300}}}\nvariants: {kv: {}}\n",
     r"source: give exactly one of hub, path, random"),
    ("family: gpt2\nsource: {random: {config: nosuch, seed: 0, tokenizer: {train_on: x, vocab_size: 300}}}\nvariants: {kv: {}}\n",
     r"no named config 'nosuch'; known:"),
    (GOOD_HEAD + "variants: {kv: {}}\nruntime: {prompt_template: 'no placeholder'}\n", r"prompt_template must contain \{word\}"),
])
def test_bad_recipe_gives_one_line_naming_file_and_key(tmp_path, body, match):
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_shipped_recipes_load():
    from conftest import REPO
    from onnxforge.config import load_recipes

    recipes = load_recipes(REPO / "recipes")
    assert {"gpt2-tiny", "gpt2-medium", "gpt2-medium-random"} <= set(recipes)
    assert recipes["gpt2-medium"].body.source.hub.revision == "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"
    assert sorted(n for n, r in recipes.items() if r.body.default) == [
        "gpt2-pocket", "gpt2-tiny", "sam-pocket", "sam-tiny", "sd-pocket", "sd-tiny", "sd-tiny-lcm"]


def test_offline_hub_source_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"openai-community/gpt2-medium@6dcaa7a952f7 is not in the Hugging Face cache.*huggingface-cli download"):
        hub_snapshot("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", ["config.json"])


def test_building_an_uncached_hub_recipe_fails_fast_with_the_repo_named(tmp_path):
    from conftest import REPO

    project = new_project(tmp_path / "p", {"gpt2-medium": (REPO / "recipes" / "gpt2-medium.yaml").read_text()})
    hf = tmp_path / "hf"
    proc = project.doit("build", "recipes=gpt2-medium", check=False, HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"),
                        HF_HUB_OFFLINE="1")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "source:gpt2-medium: openai-community/gpt2-medium@6dcaa7a952f7 is not in the Hugging Face cache" in text
    assert "Traceback" not in text


def test_unknown_recipe_name_on_build(tiny):
    proc = tiny.doit("build", "recipes=gpt2-huge", check=False)
    assert proc.returncode != 0 and "unknown recipe(s) gpt2-huge; known: gpt2-tiny" in proc.stdout + proc.stderr


@pytest.fixture()
def copied_kv(tiny, tmp_path):
    dst = tmp_path / "kv"
    shutil.copytree(tiny.variant("kv"), dst)
    return dst


def test_tampered_onnx_is_refused_naming_the_file(copied_kv):
    model = copied_kv / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(art.ArtifactError, match=r"model\.onnx: sha256 does not match the manifest"):
        art.load(copied_kv)


def test_truncated_onnx_is_refused(copied_kv):
    model = copied_kv / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(art.ArtifactError, match=r"model\.onnx: 1000 bytes, manifest says"):
        art.load(copied_kv)


def test_manifest_pointing_to_missing_file_is_refused(copied_kv):
    (copied_kv / "model.onnx").unlink()
    with pytest.raises(art.ArtifactError, match=r"model\.onnx: file named by the manifest \(component decoder\) is missing"):
        art.load(copied_kv)


def test_manifest_inputs_that_do_not_match_the_model_are_refused(copied_kv):
    manifest = json.loads((copied_kv / art.MANIFEST).read_text())
    manifest["components"]["decoder"]["inputs"][0]["name"] = "tokens"
    (copied_kv / art.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(art.ArtifactError, match=r"inputs \['input_ids'.* do not match the manifest's \['tokens'"):
        TextGenerator(copied_kv)


def test_missing_artifact_and_folder_without_manifest(tmp_path):
    with pytest.raises(art.ArtifactError, match=r"no artifact at .*build it with `doit build`"):
        art.load(tmp_path / "nothing")
    with pytest.raises(art.ArtifactError, match=r"holds no manifest\.json and no LATEST"):
        art.load(tmp_path)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_prompt(tiny, text):
    gen = TextGenerator(tiny.variant("kv"))
    with pytest.raises(ValueError, match=r"empty prompt: give a word or phrase"):
        gen.generate(text)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, r"max tokens must be at least 1 \(got 0\)"),
    ({"max_new_tokens": -5}, r"max tokens must be at least 1 \(got -5\)"),
    ({"temperature": 0}, r"temperature must be > 0"),
    ({"top_p": 0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
    ({"top_k": -1}, r"top-k must be >= 0"),
    ({"repetition_penalty": 0}, r"repetition penalty must be > 0"),
])
def test_bad_sampling_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingSettings(**kwargs)


@pytest.mark.parametrize("args, match", [
    (["generate", ""], "empty prompt"),
    (["generate", "x", "--max-tokens", "0"], "max tokens must be at least 1"),
    (["generate", "x", "--artifact", "does/not/exist"], "no artifact at does/not/exist"),
    (["inspect", "does/not/exist"], "no artifact at does/not/exist"),
])
def test_cli_errors_are_one_line_with_exit_2(tiny, args, match):
    if "--artifact" not in args and args[0] == "generate":
        args = args + ["--artifact", str(tiny.variant("kv"))]
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and lines[0].startswith(f"onnxforge {args[0]}: error:")


def test_missing_calibration_corpus_fails_the_source_stage(tmp_path):
    project = new_project(tmp_path / "p", {"quick": GOOD_HEAD + "variants: {kv: {}}\n"})
    (project.dir / "calibration" / "tokenizer-corpus.txt").unlink()
    proc = project.doit("build", "recipes=quick", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tokenizer-corpus.txt: tokenizer corpus is missing or empty" in text


def test_broken_recipe_in_the_project_is_one_line_for_doit(tmp_path):
    project = new_project(tmp_path / "p", {"broken": "family: gpt2\nvariants: [kv\n"})
    proc = project.doit("list", check=False)  # the others still list (issue 10, item 14)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert "broken.yaml: malformed YAML at line" in text and "Traceback" not in text
    proc = project.doit("build", "recipes=broken", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "broken.yaml: malformed YAML at line" in text and "Traceback" not in text
