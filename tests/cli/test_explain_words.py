"""``captum-iclip explain --text-method``: each prompt's words with their relevance, printed and drawn apart from
the map grid, which stays as it was."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from captum_iclip import CLIPSimilarity, cli, explain_text, load
from captum_iclip.cli.explain import text_figure_path
from captum_iclip.preprocess import center_crop_transform

PROMPTS = ["a red circle", "a blue square on grass"]


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    from captum_iclip.world import generate_scene

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(generate_scene(10_000_000).image).save(path)
    return path


def test_text_method_prints_and_draws_the_words(scene_png, tmp_path, capsys):
    out = tmp_path / "maps.png"
    status = cli.main(
        ["explain", str(scene_png), "--prompts", ",".join(PROMPTS), "--out", str(out), "--text-method", "chefer"]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert out.is_file() and Image.open(out).size[0] > 0  # the map grid, as without the option
    words = tmp_path / "maps-words.png"
    assert text_figure_path(str(out)) == str(words) and Image.open(words).size[0] > 0
    assert f"wrote {out}\n" in captured.out and f"wrote {words}\n" in captured.out
    assert "the model's prompt templates are not applied" in captured.out  # the bundled model has templates
    printed = {
        text: [(token, float(value)) for token, value in re.findall(r"(\S+)\(([+-][0-9.]+)\)", line)]
        for text, line in re.findall(r"^  (.+?): (.+)$", captured.out, re.M)
    }
    # The same numbers as explain_text on the command's input (the bundled model, its centre crop).
    loaded = load()
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, PROMPTS, templates=loaded.templates, output="probs")
    adapter = sim.adapter
    transform = center_crop_transform(adapter.image_size, adapter.image_mean, adapter.image_std)
    image = transform(Image.open(scene_png).convert("RGB"))[None].to(adapter.parameter.dtype)
    for result in explain_text(sim, image, "chefer"):
        assert [token for token, _ in printed[result.text]] == list(result.tokens) == result.text.split()
        values = torch.tensor([value for _, value in printed[result.text]])
        torch.testing.assert_close(values, result.relevance, atol=5e-4, rtol=0)
        assert abs(float(values.sum()) - 1) < 2e-3  # Chefer's word relevances sum to 1


def test_text_method_m2ib_prints_the_words_of_its_bottleneck(scene_png, tmp_path, capsys):
    out = tmp_path / "maps.png"
    argv = ["explain", str(scene_png), "--prompts", PROMPTS[1], "--out", str(out), "--text-method", "m2ib"]
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (tmp_path / "maps-words.png").is_file() and "words by m2ib" in captured.out
    printed = [float(value) for value in re.findall(r"\S+\(([+-][0-9.]+)\)", captured.out)]
    loaded = load()
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, PROMPTS[1:], templates=loaded.templates, output="probs")
    adapter = sim.adapter
    transform = center_crop_transform(adapter.image_size, adapter.image_mean, adapter.image_std)
    image = transform(Image.open(scene_png).convert("RGB"))[None].to(adapter.parameter.dtype)
    (result,) = explain_text(sim, image, "m2ib")
    # The same numbers as explain_text: the information min-max normalised over the whole text, in [0, 1].
    torch.testing.assert_close(torch.tensor(printed), result.relevance, atol=5e-4, rtol=0)
    assert len(printed) == len(PROMPTS[1].split()) and 0 <= min(printed) <= max(printed) <= 1


def test_without_text_method_nothing_changes(scene_png, tmp_path, capsys):
    out = tmp_path / "maps.png"
    assert cli.main(["explain", str(scene_png), "--prompts", ",".join(PROMPTS), "--out", str(out)]) == 0
    captured = capsys.readouterr().out
    assert "words" not in captured and not (tmp_path / "maps-words.png").exists()


def test_text_options_are_checked_before_any_work(scene_png, tmp_path, capsys):
    argv = ["explain", str(scene_png), "--prompts", "a", "--out", str(tmp_path / "m.png")]
    assert cli.main([*argv, "--text-out", str(tmp_path / "w.png")]) == 2
    assert "--text-out: expected --text-method with it" in capsys.readouterr().err
    assert cli.main([*argv, "--text-method", "gradeclip", "--text-out", str(tmp_path)]) == 2
    assert "--text-out: expected a file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--text-method", "lime"])
    assert "invalid choice: 'lime'" in capsys.readouterr().err


def test_word_colours_known_answers():
    from captum_iclip.viz import word_colours, word_relevance_figure

    colours = word_colours(torch.tensor([0.0, 2.0, -1.0, 1.0]))
    assert colours.shape == (4, 3)
    assert colours[0] == pytest.approx([1.0, 1.0, 1.0], abs=1e-2)  # 0 is white
    assert colours[1][0] > 0.99 and colours[1][2] < 0.5  # the strongest positive word: red
    assert colours[2][2] > 0.99 and colours[2][0] < 0.8  # negative: blue, half as strong as the strongest
    assert colours[3] == pytest.approx(colours[2][::-1], abs=1e-2)  # +1 mirrors -1
    assert word_colours([0.0, 0.0]).min() > 0.99  # nothing relevant: white
    with pytest.raises(ValueError, match="rows: expected one relevance per token of 'x' \\(2\\), got 1"):
        word_relevance_figure([("x", ["a", "b"], [1.0])])
