"""The face-swap autoencoder (one shared encoder, one decoder per person; or, in the LIAE layout, one decoder body
behind per-person inter layers), the critics of train.py's adversarial losses, and the checkpoint file.

Presets only change the numbers in MODEL_CONFIGS: "original" is the tutorial's model exactly (64x64 faces,
82.06 M parameters), "tiny" a sixteenth of its compute for CPUs, the *128 presets draw 128x128 faces. A checkpoint
carries its model's config, so the apply scripts rebuild any preset from it (load_model) with this file alone.
"""
import io
from pathlib import Path

import torch
from torch import nn

import align
import utils

CHECKPOINT = "checkpoint.pt"            # train.py's latest checkpoint in its model folder
BEST_CHECKPOINT = "checkpoint_best.pt"  # the copy with the lowest loss so far
REACH_MIN = 0.1  # a decoder's reach: where its person's loss region covered at least this share of their faces

# Presets: face size (in and out), encoder conv widths, bottleneck width, decoder widths, residual blocks
# after each decoder upscale, output channels (3 = colour; 4 = colour + a learned face mask), the size the
# encoder works at (the face is averaged down to it first; default the face size), and the layout ("df": a
# decoder per person; "liae": DeepFaceLab's LIAE, one decoder body behind per-person inter layers). Every preset
# also takes train.py's --coverage (the config key "coverage"): the share of the model's square that the face's
# features (brows to lips, align.MEAN_FACE) fill; 1 is the tutorial's crop, smaller takes in the chin and cheeks.
MODEL_CONFIGS = {
    # The tutorial's model: 3->128->256->512->1024, dense 1024, decoders 256->128->64.
    "original": dict(input_size=64, encoder_channels=(128, 256, 512, 1024), latent_dim=1024,
                     decoder_channels=(256, 128, 64)),
    # Same layout at 128 px: one more upscale in each decoder.
    "original128": dict(input_size=128, encoder_channels=(128, 256, 512, 1024, 1024), latent_dim=1024,
                        decoder_channels=(256, 128, 64, 32)),
    # A small model for quick CPU runs and tests (about 1/16 of the compute).
    "tiny": dict(input_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                 decoder_channels=(64, 32, 16)),
    # The CPU preset: 128 px out, a residual block after each decoder upscale but the last,
    # a learned mask as a 4th output channel (several times tiny's compute per face).
    "lite128": dict(input_size=128, encoder_channels=(32, 64, 128, 256, 512), latent_dim=256,
                    decoder_channels=(128, 64, 32, 16), residual_blocks=1, output_channels=4, output_kernel=3),
    # tiny's encoder on the face averaged down to 64 px, decoders with one more upscale: 128 px out at about
    # twice tiny's training time per face (lite128: four to five times; docs/SPEED.md).
    "tiny128": dict(input_size=128, encoder_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                    decoder_channels=(64, 32, 16, 16), output_kernel=3),
    # tiny128 with twice the channels where the finest detail is drawn (the decoders' last two stages, at 64 and
    # 128 px): is the detail that stops growing after an hour held back by those 16 channels? (docs/QUALITY.md)
    "tiny128_fine": dict(input_size=128, encoder_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                         decoder_channels=(64, 32, 32, 32), output_kernel=3),
    # tiny128 with the encoder reading the face at 128 px: a learned stride-2 block (16 channels) in place of the
    # averaging down to 64 px, then tiny's blocks (about tiny128's speed). Is the detail that stops growing after an
    # hour held back by what the code can see? And the same with a code twice as long. Neither: docs/QUALITY.md
    "tiny128_enc128": dict(input_size=128, encoder_channels=(16, 32, 64, 128, 256), latent_dim=256,
                           decoder_channels=(64, 32, 16, 16), output_kernel=3),
    "tiny128_enc128_code512": dict(input_size=128, encoder_channels=(16, 32, 64, 128, 256), latent_dim=512,
                                   decoder_channels=(64, 32, 16, 16), output_kernel=3),
    # tiny with decoders twice as wide (the encoder and the bottleneck unchanged): more capacity where the face is
    # drawn, at ~1.9x tiny's training time per face (docs/QUALITY.md)
    "tiny_wide": dict(input_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                      decoder_channels=(128, 64, 32)),
    # tiny with a detail stage per person: each decoder's 64 px face redrawn at 128 px, learned from that person's
    # real faces at 128 px (DetailNet)
    "tiny_detail": dict(input_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                        decoder_channels=(64, 32, 16), detail_scale=2),
    # tiny128 with a detail stage per person: each decoder's 128 px face redrawn at 256 px, learned from that
    # person's real faces at 256 px; can be started from a tiny128 model (train.py --init)
    "tiny128_detail": dict(input_size=128, encoder_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                           decoder_channels=(64, 32, 16, 16), output_kernel=3, detail_scale=2),
    # tiny in DeepFaceLab's LIAE layout: the encoder's dense expansion is the inter layer both people share (AB),
    # A has one more of its own; one decoder body draws both from the two inter layers' outputs side by side
    # (A: its own and AB's; B: AB's twice), so the swap (A's face with B's inputs) reaches the body in the form it
    # was trained on for B. 1.18x tiny's training time per face (docs/QUALITY.md)
    "tiny_liae": dict(input_size=64, encoder_channels=(32, 64, 128, 256), latent_dim=256,
                      decoder_channels=(64, 32, 16), layout="liae"),
}
LAYOUTS = ("df", "liae")


def model_config(name):
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return dict(name=name, **MODEL_CONFIGS[name])


class ConvBlock(nn.Sequential):
    """5x5 conv, stride 2 ('same' padding), LeakyReLU(0.1): halves the size."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 5, stride=2, padding=2), nn.LeakyReLU(0.1))


class UpscaleBlock(nn.Sequential):
    """3x3 conv to 4x channels, LeakyReLU(0.1), PixelShuffle(2): doubles the size."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout * 4, 3, padding=1), nn.LeakyReLU(0.1), nn.PixelShuffle(2))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a skip connection (as DeepFaceLab's decoders): detail without a new scale."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class Encoder(nn.Module):
    def __init__(self, input_size, encoder_channels, latent_dim, encoder_size):
        super().__init__()
        self.pool = input_size // encoder_size  # the face is averaged down by this first
        widths = (3, *encoder_channels)
        self.convs = nn.Sequential(*[ConvBlock(a, b) for a, b in zip(widths, widths[1:])])
        top = encoder_channels[-1]
        side = encoder_size // 2 ** len(encoder_channels)  # 4 for the original
        self.top, self.side = top, side
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(top * side * side, latent_dim),
                                   nn.Linear(latent_dim, top * 4 * 4))
        self.upscale = UpscaleBlock(top, top // 2)

    def code(self, x):                             # (B, 3, 64, 64)
        """The bottleneck: what the decoders learn to draw a face from."""
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        x = self.convs(x)                          # (B, 1024, 4, 4)
        return self.dense[1](self.dense[0](x))     # (B, 1024)

    def expand(self, code):
        x = self.dense[2](code)                    # (B, 16384)
        x = x.view(-1, self.top, 4, 4)             # (B, 1024, 4, 4)
        return self.upscale(x)                     # (B, 512, 8, 8)

    def forward(self, x):
        return self.expand(self.code(x))


class Decoder(nn.Module):
    def __init__(self, in_channels, decoder_channels, residual_blocks=0, output_channels=3, output_kernel=5):
        super().__init__()
        widths = (in_channels, *decoder_channels)
        stages = []
        for k, (a, b) in enumerate(zip(widths, widths[1:])):
            stages.append(UpscaleBlock(a, b))
            if k < len(decoder_channels) - 1:  # not at full size, where a block costs the most
                stages += [ResidualBlock(b) for _ in range(residual_blocks)]
        self.upscales = nn.Sequential(*stages)
        self.to_rgb = nn.Conv2d(decoder_channels[-1], output_channels, output_kernel, padding=output_kernel // 2)

    def forward(self, x):                          # (B, 512, 8, 8)
        x = self.upscales(x)                       # (B, 64, 64, 64)
        return torch.sigmoid(self.to_rgb(x))       # (B, 3, 64, 64): colour (+ mask as a 4th channel)


class DetailNet(nn.Module):
    """A person's detail stage: a decoder's face redrawn at `scale` x its size. It adds what it learned from that
    person's real faces at the larger size to the bilinear enlargement, so it starts as that enlargement and can
    only add the person's own detail (eyelids, lashes, teeth, skin): nothing of anyone else's."""

    def __init__(self, scale=2, channels=16, blocks=3):
        super().__init__()
        if scale not in (2, 4):
            raise ValueError("detail_scale must be 1 (none), 2 or 4")
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.up = nn.Sequential(*[UpscaleBlock(channels, channels) for _ in range(scale.bit_length() - 1)])
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.to_rgb.weight)  # at first exactly the enlargement
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, face):                       # (B, 3, 64, 64) in [0, 1]
        enlarged = nn.functional.interpolate(face, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return enlarged + self.to_rgb(self.up(self.body(self.head(face))))  # (B, 3, 128, 128)


class Inter(nn.Sequential):
    """A bottleneck code expanded to the decoders' 8x8 input, as the encoder's own expansion does (the LIAE
    layout's inter layer of one person)."""

    def __init__(self, latent_dim, top):
        super().__init__(nn.Linear(latent_dim, top * 4 * 4), nn.Unflatten(1, (top, 4, 4)), UpscaleBlock(top, top // 2))


class FaceSwapModel(nn.Module):
    """Shared encoder + decoder_a + decoder_b (+ a detail stage per person). forward(x, side) with side "a" or "b"
    gives the decoder's face; draw(x, side) the face at the output size (through the detail stage, if any).

    In the "liae" layout decoder_a and decoder_b are one module (one body): what tells it whose face to draw is
    its input, the encoder's expansion of the code (shared by both people) beside A's own inter layer (inter_a)
    for A, beside itself for B."""

    def __init__(self, name="original", input_size=64, encoder_channels=(128, 256, 512, 1024),
                 latent_dim=1024, decoder_channels=(256, 128, 64), residual_blocks=0, output_channels=3,
                 output_kernel=5, encoder_size=None, detail_scale=1, layout="df", coverage=1.0):
        super().__init__()
        encoder_size = encoder_size or input_size
        if input_size != 8 * 2 ** len(decoder_channels):
            raise ValueError(f"input_size {input_size} needs {input_size // 8} = 2^len(decoder_channels)")
        if encoder_size > input_size or input_size % encoder_size:
            raise ValueError(f"encoder_size {encoder_size} must divide input_size {input_size}")
        if encoder_size // 2 ** len(encoder_channels) < 1:
            raise ValueError("too many encoder blocks for the input size")
        if output_channels not in (3, 4):
            raise ValueError("output_channels must be 3 (colour) or 4 (colour + mask)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if not align.FACE_COVERAGE <= coverage <= 1:  # the model's square must lie inside the stored 256 px face
            raise ValueError(f"coverage must be between {align.FACE_COVERAGE} and 1, not {coverage}")
        self.config = dict(name=name, input_size=input_size, encoder_channels=tuple(encoder_channels),
                           latent_dim=latent_dim, decoder_channels=tuple(decoder_channels),
                           residual_blocks=residual_blocks, output_channels=output_channels,
                           output_kernel=output_kernel, encoder_size=encoder_size, detail_scale=detail_scale,
                           layout=layout, coverage=float(coverage))
        self.encoder = Encoder(input_size, encoder_channels, latent_dim, encoder_size)
        top = encoder_channels[-1]
        decoder = (decoder_channels, residual_blocks, output_channels, output_kernel)
        if layout == "liae":  # one body; its input is two expansions (top // 2 channels each) side by side
            self.inter_a = Inter(latent_dim, top)
            self.decoder_a = self.decoder_b = Decoder(2 * (top // 2), *decoder)
        else:
            self.decoder_a = Decoder(top // 2, *decoder)
            self.decoder_b = Decoder(top // 2, *decoder)
        if detail_scale > 1:
            self.detail_a, self.detail_b = DetailNet(detail_scale), DetailNet(detail_scale)
        self.reach = None  # from the checkpoint: {"a": uint8 (S, S), "b": ...}, train.region_reach of each side

    @property
    def input_size(self):
        return self.config["input_size"]

    @property
    def coverage(self):
        """The share of the model's square that the face's features fill (align.align_matrix's coverage)."""
        return self.config["coverage"]

    @property
    def face_share(self):
        """The central share of a stored (crop_face.py) face that the model sees (align.center_face's coverage)."""
        return align.FACE_COVERAGE / self.config["coverage"]

    @property
    def output_size(self):
        """The size of the faces draw() gives."""
        return self.config["input_size"] * self.config["detail_scale"]

    def detail(self, side):
        """The detail stage of a side, or None."""
        self.decoder(side)  # rejects a side other than "a" or "b"
        return getattr(self, f"detail_{side}", None)

    def enlarge(self, face, side):
        """A decoder's face (B, C, S, S) at the output size: colour through the side's detail stage, a mask channel
        enlarged bilinearly."""
        detail = self.detail(side)
        if detail is None:
            return face
        colour = detail(face[:, :3])
        if face.shape[1] == 3:
            return colour
        mask = nn.functional.interpolate(face[:, 3:], scale_factor=detail.scale, mode="bilinear", align_corners=False)
        return torch.cat([colour, mask], 1)

    def draw(self, x, side):
        """The face of `side`'s person for faces x, at the output size."""
        return self.enlarge(self(x, side), side)

    def reach_mask(self, side):
        """float32 (S, S), 1 where `side`'s decoder was taught to draw (its person's loss region on at least REACH_MIN
        of their training faces), else 0; None for a model without that record (checkpoints made before it)."""
        self.decoder(side)  # rejects a side other than "a" or "b"
        return None if self.reach is None else reach_mask(self.reach[side])

    @property
    def has_mask(self):
        """Whether the decoders also output a face mask (a 4th channel)."""
        return self.config["output_channels"] == 4

    def decoder(self, side):
        if side == "a":
            return self.decoder_a
        if side == "b":
            return self.decoder_b
        raise ValueError(f"side must be 'a' or 'b', not {side!r}")

    def decode(self, code, side, expanded=None):
        """side's face drawn from bottleneck codes; `expanded`: the encoder's expansion of them, if made already."""
        decoder = self.decoder(side)
        z = self.encoder.expand(code) if expanded is None else expanded
        if self.config["layout"] == "liae":
            z = torch.cat([z if side == "b" else self.inter_a(code), z], 1)
        return decoder(z)

    def forward(self, x, side):
        return self.decode(self.encoder.code(x), side)

    def forward_both(self, x_a, x_b):
        """One encoder pass over both sides' batches (cheaper than two), then each decoder."""
        return self.forward_training(x_a, x_b)[:2]

    def forward_training(self, x_a, x_b, swaps=False):
        """(A's faces through decoder A, B's through decoder B, the bottleneck codes of A's faces then B's, and with
        swaps=True each side's faces drawn as the other person: (A's through decoder B, B's through decoder A),
        else None). One encoder pass over both sides."""
        code = self.encoder.code(torch.cat([x_a, x_b]))
        z, n = self.encoder.expand(code), len(x_a)
        if not swaps:
            return self.decode(code[:n], "a", z[:n]), self.decode(code[n:], "b", z[n:]), code, None
        out_a, out_b = self.decode(code, "a", z), self.decode(code, "b", z)  # each decoder once over both sides
        return out_a[:n], out_b[n:], code, (out_b[:n], out_a[n:])


class PatchDiscriminator(nn.Sequential):
    """Real or drawn, judged patch by patch (PatchGAN): logits (B, 1, size/4, size/4) for faces (B, 3, size, size)
    (size/8 for faces over 64 px), each seeing about a quarter of a face's width, so it judges the texture of eyes,
    lips and skin rather than the face's layout. Small: it costs a tenth of the tiny model's step per face."""

    def __init__(self, size, channels=16):
        sn = nn.utils.parametrizations.spectral_norm
        c = channels
        layers = [sn(nn.Conv2d(3, c, 3, padding=1)), nn.LeakyReLU(0.2),
                  sn(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
                  sn(nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        if size > 64:  # one more halving for larger faces: the same share of the face per patch
            layers += [sn(nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        super().__init__(*layers, sn(nn.Conv2d(4 * c, 1, 3, padding=1)))


class CodeDiscriminator(nn.Sequential):
    """Whose face a bottleneck code came from (A or B): logits (B, 1) for codes (B, latent_dim)."""

    def __init__(self, latent_dim, width=256):
        super().__init__(nn.Linear(latent_dim, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                         nn.LeakyReLU(0.2), nn.Linear(width, 1))


class Critics(nn.Module):
    """What the adversarial losses train beside the autoencoder (train.py only): a patch discriminator for each
    person's faces and a code discriminator. Rebuilt from the model's config."""

    def __init__(self, input_size, latent_dim):
        super().__init__()
        self.faces_a, self.faces_b = PatchDiscriminator(input_size), PatchDiscriminator(input_size)
        self.code = CodeDiscriminator(latent_dim)

    def faces(self, side):
        return self.faces_a if side == "a" else self.faces_b

    def forward(self, faces_a=None, faces_b=None, code=None):
        """Logits of whatever is given (None for what is not): one call, so that DDP sees one forward a step."""
        return tuple(None if x is None else net(x) for net, x in ((self.faces_a, faces_a), (self.faces_b, faces_b),
                                                                  (self.code, code)))


def build_critics(config):
    """The critics of a model's config: their patch discriminators judge the faces at the model's output size."""
    return Critics(config["input_size"] * config.get("detail_scale", 1), config["latent_dim"])


def build_model(config):
    """Rebuild a model from a config dict (as stored in checkpoints)."""
    return FaceSwapModel(**config)


def reach_mask(reach, least=REACH_MIN):
    """float32 0/1 of a recorded reach (uint8, the share of faces x 255, as train.region_reach makes it): 1 where the
    share is at least `least`."""
    return (reach >= round(255 * least)).astype("float32")


# ---------------------------------------------------------------- checkpoints: written by train.py, read by all


def save_checkpoint(model_dir, state, is_best=False):
    """Write state to model_dir/checkpoint.pt atomically; when is_best, the same bytes to checkpoint_best.pt.

    state: model (state dict), config (the model's), step, and what train.py adds (optimizer, best_loss, seed,
    identities, critics); convert_video.py needs only model, config, step and identities."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    utils.write_bytes_atomic(Path(model_dir) / CHECKPOINT, data)
    if is_best:  # the bytes in memory, not a re-read of the file just written
        utils.write_bytes_atomic(Path(model_dir) / BEST_CHECKPOINT, data)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, or a one-line UserError for a missing, corrupt or foreign file.

    Only tensors and plain values are unpickled (weights_only): a file that holds anything else is refused, never
    run."""
    path = Path(path)
    if not path.is_file():
        raise utils.UserError(f"no checkpoint at {path} (train a model with train.py first)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises many types (IndexError, EOFError, UnpicklingError, ...) for a foreign file
        raise utils.UserError(f"cannot read checkpoint {path}: not a checkpoint of this project (damaged, cut short, "
                              "or another program's file)") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise utils.UserError(f"{path} is not a checkpoint of this project (no model/config/step)")
    if not (isinstance(ckpt["step"], int) and ckpt["step"] >= 0 and isinstance(ckpt["config"], dict)
            and isinstance(ckpt["model"], dict)):
        raise utils.UserError(f"{path} is damaged: its step, config or weights are not what train.py writes")
    return ckpt


def model_from_checkpoint(ckpt):
    """The model a checkpoint dict describes, with its weights."""
    try:
        model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise utils.UserError(f"checkpoint does not match its model config: {str(e).splitlines()[0][:200]}") \
            from None
    reach = ckpt.get("reach")
    if reach is not None:
        size = (model.output_size, model.output_size)
        if not (isinstance(reach, dict) and all(isinstance(reach.get(side), torch.Tensor) and
                                                tuple(reach[side].shape) == size and reach[side].dtype == torch.uint8
                                                for side in "ab")):
            raise utils.UserError("checkpoint is damaged: its record of where each decoder was trained is not what "
                                  "train.py writes")
        model.reach = {side: reach[side].numpy() for side in "ab"}
    return model


def load_model(path, map_location="cpu"):
    """(model in eval mode, the checkpoint's step) from a checkpoint file."""
    ckpt = load_checkpoint(path, map_location)
    return model_from_checkpoint(ckpt).eval(), ckpt["step"]
