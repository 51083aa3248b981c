"""Generate videos with a causal (chunk-wise autoregressive) Wan pipeline (the `trl-arcopo generate` script).

    python examples/generate.py                                          # tiny offline demo (CPU, seconds)
    python examples/generate.py --preset self-forcing --prompt "A corgi surfing at sunset"           # real model (GPU)
    python examples/generate.py --preset self-forcing --lora outputs/self-forcing-arcopo --lora my/other-lora=0.5

Writes mp4 files when the `video` extra (imageio + imageio-ffmpeg) is installed, else PNG contact sheets.
"""

from trl_arcopo.scripts.generate import main

if __name__ == "__main__":
    main()
