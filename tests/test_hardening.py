"""Issue 10: every file verified, every failure one line (integrity, wrong artifacts, output paths, CLI parsing)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
from pathlib import Path

import pytest

from onnxforge.config import RecipeError, load_recipe
from onnxforge.runtime import artifact as art
from onnxforge.runtime.sam import SamPredictor
from onnxforge.runtime.sd import StableDiffusion
from onnxforge.runtime.text import TextGenerator

from conftest import REPO, new_project, run_cli


def _one_line_error(proc, pattern: str) -> None:
    """Exit 2, one line on stderr matching pattern, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(pattern, err), err


def _files_on_disk(version_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(version_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(version_dir.rglob("*")) if p.is_file() and p.name != art.MANIFEST}


@pytest.fixture(scope="module")
def kv(tiny):
    return tiny.variant("kv")


@pytest.fixture(scope="module")
def sam_fp32(sam_tiny):
    return sam_tiny.variant("fp32", recipe="sam-tiny")


@pytest.fixture(scope="module")
def sd_fp32(sd_tiny):
    return sd_tiny.variant("fp32", recipe="sd-tiny")


@pytest.fixture(scope="module")
def sd_int8(sd_tiny):
    return sd_tiny.variant("int8", recipe="sd-tiny")


# ---- 1. integrity: every file the runtime reads is in the manifest and verified --------------------


def test_manifest_lists_every_published_file_with_size_and_sha256(kv, sam_fp32, sd_fp32, sd_int8):
    """issue 10, item 1: tokenizers, scheduler config, SD tokenizer folder, ranges: all in manifest["files"]."""
    for version_dir in (kv, sam_fp32, sd_fp32, sd_int8):
        manifest = json.loads((version_dir / art.MANIFEST).read_text())
        listed = {r["file"]: r for r in manifest["files"]}
        on_disk = _files_on_disk(version_dir)
        assert set(listed) == set(on_disk), version_dir
        for name, digest in on_disk.items():
            assert listed[name]["sha256"] == digest
            assert listed[name]["bytes"] == (version_dir / name).stat().st_size
    assert "tokenizer.json" in {r["file"] for r in json.loads((kv / art.MANIFEST).read_text())["files"]}
    sd_files = {r["file"] for r in json.loads((sd_fp32 / art.MANIFEST).read_text())["files"]}
    assert "scheduler_config.json" in sd_files and any(f.startswith("tokenizer/") for f in sd_files)


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b'"') + 1  # inside the JSON, same size
    data[i] = ord("Q") if data[i] != ord("Q") else ord("R")
    path.write_bytes(bytes(data))


def test_edited_or_deleted_tokenizer_is_refused_naming_the_file(kv, tmp_path):
    """issue 10, item 1: an edited tokenizer.json used to fail later with `Token ... out of vocabulary`,
    a deleted one with `No such file or directory (os error 2)` and no path."""
    edited = tmp_path / "edited"
    shutil.copytree(kv, edited)
    _flip_one_byte(edited / "tokenizer.json")
    with pytest.raises(art.ArtifactError, match=r"tokenizer\.json: sha256 does not match the manifest"):
        TextGenerator(edited)
    _one_line_error(run_cli("generate", "lighthouse", "--artifact", str(edited)),
                    r"edited/tokenizer\.json: sha256 does not match the manifest.*rebuild")

    deleted = tmp_path / "deleted"
    shutil.copytree(kv, deleted)
    (deleted / "tokenizer.json").unlink()
    _one_line_error(run_cli("generate", "lighthouse", "--artifact", str(deleted)),
                    r"deleted/tokenizer\.json: file named by the manifest \(files\) is missing")


@pytest.mark.parametrize("name", ["scheduler_config.json", "tokenizer/tokenizer.json"])
def test_edited_sd_config_or_tokenizer_folder_file_is_refused(sd_fp32, tmp_path, name):
    """issue 10, item 1: the SD artifact's scheduler config and tokenizer folder are verified too."""
    copy = tmp_path / "sd"
    shutil.copytree(sd_fp32, copy)
    assert (copy / name).is_file(), sorted(_files_on_disk(copy))
    _flip_one_byte(copy / name)
    with pytest.raises(art.ArtifactError, match=re.escape(name) + r": sha256 does not match the manifest"):
        StableDiffusion(copy)


def test_manifest_without_a_file_list_is_refused(kv, tmp_path):
    """issue 10, item 1: a manifest that cannot vouch for its tokenizer is not trusted."""
    copy = tmp_path / "kv"
    shutil.copytree(kv, copy)
    manifest = json.loads((copy / art.MANIFEST).read_text())
    del manifest["files"]
    (copy / art.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(art.ArtifactError, match=r"no \"files\" list.*rebuild the artifact"):
        art.load(copy)


# ---- 2. permissions ------------------------------------------------------------------------------


def test_published_files_are_readable_by_every_user(tiny, sam_tiny, sd_tiny):
    """issue 10, item 2: *.onnx.data were published 0600 (a PermissionError for other users)."""
    checked = 0
    for project in (tiny, sam_tiny, sd_tiny):
        for manifest in project.artifacts.glob("*/*/*/" + art.MANIFEST):
            version_dir = manifest.parent
            for p in [version_dir, *version_dir.rglob("*")]:
                mode = stat.S_IMODE(p.stat().st_mode)
                assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"
                checked += 1
    assert checked > 20 and any(sd_tiny.artifacts.rglob("*.onnx.data"))


# ---- 3a. the same version is the same bytes --------------------------------------------------------


def test_trained_clip_tokenizer_is_the_same_every_time(tmp_path):
    """issue 10, item 3a (cause): tokenizers' BPE trainer numbered the `x</w>` symbols in hash-map order,
    so the sd-tiny vocab, hence the calibration token ids and the int8 ranges, changed from run to run."""
    from onnxforge.families.sd.source import train_clip_tokenizer

    digests = set()
    for i in range(3):
        out = tmp_path / f"tok{i}"
        train_clip_tokenizer(REPO / "calibration" / "sd-prompts.txt", 1000, out)
        digests.add(hashlib.sha256((out / "vocab.json").read_bytes() + (out / "merges.txt").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_static_int8_sd_build_is_bit_identical_across_builds(sd_tiny, sd_int8, tmp_path):
    """issue 10, item 3a: three builds of sd-tiny/int8 gave one version id and three unet.onnx sha256.
    A second build in a fresh project (fresh calibration cache) must give the same bytes, every file."""
    again = new_project(tmp_path / "again", {"sd-tiny": (REPO / "recipes" / "sd-tiny.yaml").read_text()})
    again.doit("publish:sd-tiny-int8")
    second = again.variant("int8", recipe="sd-tiny")
    assert second.name == sd_int8.name  # same version id
    first_files, second_files = _files_on_disk(sd_int8), _files_on_disk(second)
    assert first_files["unet.onnx"] == second_files["unet.onnx"]
    assert first_files == second_files
    m1, m2 = (json.loads((d / art.MANIFEST).read_text()) for d in (sd_int8, second))
    assert m1["artifact"]["content_digest"] == m2["artifact"]["content_digest"]
    assert m1["validation"]["checks"] == m2["validation"]["checks"]


# ---- 3. another family's artifact ------------------------------------------------------------------


def test_runtimes_given_another_familys_artifact_say_what_it_is(kv, sam_fp32, sd_fp32):
    """issue 10, item 3: `generate --artifact artifacts/sam-tiny/fp32` was `KeyError: 'tokenizer'`."""
    with pytest.raises(art.ArtifactError, match=r"is a Segment Anything model \(recipe sam-tiny, variant fp32, family sam\), "
                                                r"but onnxforge generate needs a GPT-2 text generator; "
                                                r"use it with `onnxforge segment --artifact"):
        TextGenerator(sam_fp32)
    with pytest.raises(art.ArtifactError, match=r"is a GPT-2 text generator \(recipe gpt2-tiny, variant kv, family gpt2\), "
                                                r"but onnxforge segment needs a Segment Anything model; "
                                                r"use it with `onnxforge generate --artifact"):
        SamPredictor(kv)
    with pytest.raises(art.ArtifactError, match=r"is a Stable Diffusion pipeline \(recipe sd-tiny.*"
                                                r"but onnxforge generate needs .*`onnxforge imagine --artifact"):
        TextGenerator(art.load(sd_fp32))


@pytest.mark.parametrize("command, wrong, reader", [
    (["generate", "lighthouse"], "sam", "onnxforge segment"),
    (["segment", "PICTURE", "--point", "5,5"], "kv", "onnxforge generate"),
    (["imagine", "a fox"], "sam", "onnxforge segment"),
    (["imagine", "a fox"], "kv", "onnxforge generate"),
])
def test_cli_with_another_familys_artifact_is_one_line(kv, sam_fp32, tmp_path, command, wrong, reader):
    """issue 10, item 3: the CLI commands say it in one line, exit 2."""
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (90, 120, 200)).save(picture)
    command = [str(picture) if c == "PICTURE" else c for c in command]
    artifact = {"kv": kv, "sam": sam_fp32}[wrong]
    extra = ["--out", str(tmp_path / "o.png")] if command[0] != "generate" else []
    _one_line_error(run_cli(*command, "--artifact", str(artifact), *extra), rf"{re.escape(str(artifact))} is .*{reader} --artifact")


# ---- 4. one rule for output paths --------------------------------------------------------------------


@pytest.fixture()
def picture(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (48, 40), (30, 160, 90)).save(path)
    return path


def _command(kind, picture, artifact, out):
    if kind == "imagine":
        return ["imagine", "a fox", "--artifact", str(artifact), "--steps", "1", "--seed", "0", "--out", str(out)]
    return ["segment", str(picture), "--artifact", str(artifact), "--point", "10,10", "--out", str(out)]


@pytest.mark.parametrize("kind", ["imagine", "segment"])
def test_unwritable_output_is_one_line_before_any_model_runs(kind, picture, tmp_path):
    """issue 10, item 4: `--out /tmp/README.md/x.png` or a read-only folder gave a PIL traceback after the
    work. The artifact given here does not exist: the output error coming first shows the check runs first."""
    missing_artifact = tmp_path / "no-such-artifact"
    a_file = tmp_path / "README.md"
    a_file.write_text("not a folder\n")
    _one_line_error(run_cli(*_command(kind, picture, missing_artifact, a_file / "x.png")),
                    r"--out .*README\.md/x\.png: .*README\.md is a file, not a folder")
    # /sys refuses new files to every user, root included (a chmod 0555 folder would not stop root)
    _one_line_error(run_cli(*_command(kind, picture, missing_artifact, "/sys/onnxforge-x.png")),
                    r"--out /sys/onnxforge-x\.png: cannot write there \(Permission denied\)")
    _one_line_error(run_cli(*_command(kind, picture, missing_artifact, tmp_path)), r"--out .*: .*PNG")


@pytest.mark.parametrize("kind", ["imagine", "segment"])
def test_missing_output_folders_are_created_by_every_command(kind, picture, sam_fp32, sd_fp32, tmp_path):
    """issue 10, item 4: imagine created missing folders while segment refused them; now both create them."""
    artifact = sd_fp32 if kind == "imagine" else sam_fp32
    out = tmp_path / "new" / "deeper" / "x.png"
    proc = run_cli(*_command(kind, picture, artifact, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()


# ---- 15. segment argument parsing -------------------------------------------------------------------


def test_negative_coordinates_parse_and_an_outside_point_is_named(picture, sam_fp32, tmp_path):
    """issue 10, item 15: `--point -5,10` was eaten by argparse ("expected one argument"). A prompt outside
    the picture is named before any model loads (the artifact given for those cases does not exist)."""
    out = ["--artifact", str(tmp_path / "no-such-artifact"), "--out", str(tmp_path / "m.png")]
    _one_line_error(run_cli("segment", str(picture), "--point", "-5,10", *out),
                    r"point \(-5, 10\) is outside the image, which is 48x40 px")
    _one_line_error(run_cli("segment", str(picture), "--point", "10,10", "--negative", "-3.5,2", *out),
                    r"point \(-3\.5, 2\) is outside the image")
    _one_line_error(run_cli("segment", str(picture), "--box", "-1,-1,10,10", *out), r"box corner \(-1, -1\) is outside")
    ok = run_cli("segment", str(picture), "--point=10,10", "--artifact", str(sam_fp32), "--out", str(tmp_path / "m.png"))
    assert ok.returncode == 0, ok.stderr


def test_pick_without_everything_says_pick_needs_everything(picture, sam_fp32, tmp_path):
    """issue 10, item 15: `--pick 1` alone said "say what to segment"."""
    _one_line_error(run_cli("segment", str(picture), "--pick", "1", "--artifact", str(sam_fp32), "--out", str(tmp_path / "m.png")),
                    r"--pick N chooses among the numbered candidates of --everything; add --everything")


# ---- 9. imagine progress -----------------------------------------------------------------------------


def test_imagine_progress_counts_unet_calls_and_is_one_line_per_stage_off_a_terminal(sd_fp32, tmp_path):
    """issue 10, item 9: `--steps 5` showed a bar to 6 labelled "5 pndm steps"; off a terminal the bar ran
    into the next line and tqdm filled logs."""
    proc = run_cli("imagine", "a fox", "--artifact", str(sd_fp32), "--steps", "5", "--scheduler", "pndm", "--seed", "0",
                   "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr  # no tqdm bar in a log
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["text encoder", "denoising", "VAE decoder"], lines
    assert "5 pndm steps = 6 UNet calls" in lines[1]
    assert "5 pndm steps = 6 UNet calls" in proc.stdout
    euler = run_cli("imagine", "a fox", "--artifact", str(sd_fp32), "--steps", "3", "--scheduler", "euler", "--seed", "0",
                    "--out", str(tmp_path / "y.png"))
    assert "3 euler steps," in euler.stdout and "UNet calls" not in euler.stdout


# ---- 13. recipe typos --------------------------------------------------------------------------------


def test_misspelt_recipe_key_names_the_closest_allowed_one(tmp_path):
    """issue 10, item 13: `varients:` reported only `variants: required key is missing`."""
    text = (REPO / "recipes" / "gpt2-tiny.yaml").read_text()
    assert "\nvariants:" in text
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("\nvariants:", "\nvarients:"))
    with pytest.raises(RecipeError, match=r"varients: unknown key; allowed: .*variants.*; did you mean variants\?$"):
        load_recipe(path)


# ---- 20. README and code agree on kv-int8's cache check ----------------------------------------------


def test_readme_says_kv_int8_cache_check_is_recorded_as_the_build_does(tiny):
    """issue 10, item 20: the README said kv-int8's "greedy cache == no cache" fails the build; it is recorded."""
    manifest = json.loads((tiny.variant("kv-int8") / art.MANIFEST).read_text())
    assert not any("cache" in c["check"] for c in manifest["validation"]["checks"])  # not a check that can fail
    assert "greedy_tokens_cache_matching_no_cache" in manifest["validation"]
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `kv-int8`"))
    failing, _, recorded = row.split("|")[3].partition("recorded only")
    assert "cache" not in failing and "greedy_tokens_cache_matching_no_cache" in recorded, row
