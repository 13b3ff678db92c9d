"""models.py: the tutorial's exact sizes, shapes, the shared encoder, side checks."""
import pytest
import torch

import models


def test_original_has_the_tutorials_parameter_count():
    model = models.build_model(models.model_config("original"))
    assert sum(p.numel() for p in model.parameters()) == 82_062_470  # 82.06 M
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder_a.parameters())
    assert (enc, dec) == (69_662_976, 6_199_747)


@pytest.mark.parametrize("name", list(models.MODEL_CONFIGS))
def test_shapes(name):
    model = models.build_model(models.model_config(name))
    s = model.input_size
    x = torch.rand(2, 3, s, s)
    z = model.encoder(x)
    assert z.shape == (2, model.config["encoder_channels"][-1] // 2, 8, 8)
    for side in "ab":
        y = model(x, side)
        assert y.shape == (2, model.config["output_channels"], s, s) and 0 <= y.min() and y.max() <= 1


def test_one_encoder_two_decoders():
    model = models.build_model(models.model_config("tiny"))
    x = torch.rand(3, 3, 64, 64)
    assert model(x, "a").sub(model(x, "b")).abs().max() > 0  # different decoders
    model.decoder_b.load_state_dict(model.decoder_a.state_dict())
    assert torch.equal(model(x, "a"), model(x, "b"))  # ... behind one shared encoder
    ya, yb = model.forward_both(x, x[:1])
    assert torch.allclose(ya, model(x, "a"), atol=1e-6) and torch.allclose(yb, model(x[:1], "b"), atol=1e-6)


@pytest.mark.parametrize("side", ["c", "A", None, 0])
def test_rejects_other_sides(side):
    model = models.build_model(models.model_config("tiny"))
    with pytest.raises(ValueError, match="side must be"):
        model(torch.rand(1, 3, 64, 64), side)


def test_unknown_config():
    with pytest.raises(ValueError, match="unknown model"):
        models.model_config("huge")
    with pytest.raises(ValueError):
        models.FaceSwapModel(input_size=96)


def test_encoder_on_a_smaller_face():
    """tiny128: the encoder sees the face averaged down to 64 px, the decoders draw 128 px."""
    model = models.build_model(models.model_config("tiny128"))
    small = models.build_model(dict(models.model_config("tiny128"), encoder_size=None, input_size=64,
                                    decoder_channels=(64, 32, 16)))
    small.encoder.load_state_dict(model.encoder.state_dict())
    x = torch.rand(2, 3, 128, 128)
    assert torch.allclose(model.encoder(x), small.encoder(torch.nn.functional.avg_pool2d(x, 2)), atol=1e-6)
    assert model(x, "b").shape == (2, 3, 128, 128)
    old = {k: v for k, v in models.model_config("tiny").items() if k != "encoder_size"}  # a checkpoint before it
    assert models.build_model(old).config == models.build_model(models.model_config("tiny")).config
    for bad in (96, 256):
        with pytest.raises(ValueError, match="encoder_size"):
            models.FaceSwapModel(input_size=128, encoder_size=bad, decoder_channels=(64, 32, 16, 16))


def test_detail_stage_starts_as_the_enlargement_and_draws_at_its_size():
    """tiny_detail draws 128 px faces: at first exactly the bilinear enlargement of the decoder's 64 px face (the
    stage adds only what it learns), per side; a model without detail stages draws the decoder's face as is."""
    model = models.build_model(models.model_config("tiny_detail"))
    x = torch.rand(2, 3, 64, 64)
    assert model.output_size == 128
    for side in "ab":
        face, drawn = model(x, side), model.draw(x, side)
        assert drawn.shape == (2, 3, 128, 128)
        enlarged = torch.nn.functional.interpolate(face, scale_factor=2, mode="bilinear", align_corners=False)
        assert torch.equal(drawn, enlarged)
    assert model.detail("a") is not model.detail("b")
    plain = models.build_model(models.model_config("tiny"))
    assert plain.output_size == 64 and torch.equal(plain.draw(x, "b"), plain(x, "b"))


def test_liae_draws_both_people_with_one_body_behind_inter_layers():
    """tiny_liae: decoder_a and decoder_b are one module; B's face comes from the shared expansion alone (A's own
    inter layer does not touch it), A's from both; forward_training draws what forward does, swaps included; its
    weights (the body under both names) rebuild it; a config from before layouts builds the DF layout."""
    model = models.build_model(models.model_config("tiny_liae"))
    assert model.decoder_a is model.decoder_b and model.config["layout"] == "liae"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x, "a"), model(x, "b")
        assert a.sub(b).abs().max() > 0
        model.inter_a[0].bias.add_(0.5)
        assert torch.equal(model(x, "b"), b) and model(x, "a").sub(a).abs().max() > 0
        ya, yb, code, (ab, ba) = model.forward_training(x, x[:1], swaps=True)
        for got, want in ((ya, model(x, "a")), (yb, model(x[:1], "b")), (ab, model(x, "b")), (ba, model(x[:1], "a"))):
            assert torch.allclose(got, want, atol=1e-6)
        rebuilt = models.model_from_checkpoint(dict(model=model.state_dict(), config=model.config, step=0)).eval()
        model.eval()
        assert torch.equal(rebuilt(x, "a"), model(x, "a")) and rebuilt.decoder_a is rebuilt.decoder_b
    old = {k: v for k, v in models.model_config("tiny").items() if k != "layout"}
    plain = models.build_model(old)
    assert plain.config["layout"] == "df" and plain.decoder_a is not plain.decoder_b and not hasattr(plain, "inter_a")
    with pytest.raises(ValueError, match="layout"):
        models.FaceSwapModel(layout="lia")


def test_coverage_is_part_of_the_config():
    """coverage (train.py --coverage) is kept in the config a checkpoint carries; a config from before it builds the
    tutorial's crop (1); values that would reach past the stored face are refused."""
    old = {k: v for k, v in models.model_config("tiny").items() if k != "coverage"}
    assert models.build_model(old).coverage == 1.0
    wide = models.build_model(dict(models.model_config("tiny"), coverage=0.8))
    rebuilt = models.model_from_checkpoint(dict(model=wide.state_dict(), config=wide.config, step=0))
    assert rebuilt.coverage == 0.8 and rebuilt.face_share == pytest.approx(160 / 256 / 0.8)
    for bad in (0.6, 1.1):
        with pytest.raises(ValueError, match="coverage"):
            models.build_model(dict(models.model_config("tiny"), coverage=bad))
