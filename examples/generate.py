"""Generate a video with a causal (chunk-wise autoregressive) Wan pipeline.

    python examples/generate.py                                  # tiny offline demo (CPU, seconds)
    python examples/generate.py --preset self-forcing --prompt "A corgi surfing at sunset"   # real model (GPU)

Writes an mp4 when the `video` extra (imageio + imageio-ffmpeg) is installed, else a PNG contact sheet of the frames.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trl_arcopo import CausalWanPipeline
from trl_arcopo.utils.videos import save_video

PRESETS = {
    # name: (num_frames, height, width)
    "tiny": (33, 64, 96),
    "self-forcing": (81, 480, 832),
}


def build_pipeline(preset: str, device: str, lora: str | None) -> CausalWanPipeline:
    if preset == "tiny":
        from trl_arcopo.testing import tiny_causal_wan_pipeline

        pipe = tiny_causal_wan_pipeline()
    else:
        pipe = CausalWanPipeline.from_self_forcing(dtype=torch.bfloat16)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--prompt", default="a red car driving on a road at night")
    parser.add_argument("--num_frames", type=int, help="pixel frames, 9 + 12·(chunks - 1) (preset default)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--lora", help="a LoRA (Hub id or folder with pytorch_lora_weights.safetensors) to apply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    num_frames, height, width = PRESETS[args.preset]
    pipe = build_pipeline(args.preset, args.device, args.lora)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    frames = pipe(
        args.prompt,
        num_frames=args.num_frames or num_frames,
        height=args.height or height,
        width=args.width or width,
        generator=generator,
        output_type="pil",
    ).frames[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    path = save_video(frames, args.output, fps=16)
    print(f"{len(frames)} frames of {frames[0].size[0]}x{frames[0].size[1]} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
