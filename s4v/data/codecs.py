"""Which video codecs each decode path reads, checked at start-up against the codec a split's index
records, so that a run never decodes its first batches and then dies (or skips every sample).

- DALI on the CPU (`data.loader: dali`, `data.device: cpu`, `fn.decoders.video`): VP8, VP9 and MJPEG
  only. DALI 2.4 refuses H.264 there ("Codec 27 (h264) is not supported by the CPU variant of this
  operator", tried on the CPU), although DALI's docs list it.
- DALI on the GPU (`data.device: gpu`, NVDEC): H.264, HEVC, VP8, VP9, MJPEG, AV1 and MPEG-4 (DALI docs);
  needs CUDA.
- PyAV (`data.loader: pyav`): whatever FFmpeg decodes; not restricted here.
"""
from __future__ import annotations

from typing import Optional

DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
DALI_GPU_CODECS = ("h264", "hevc", "vp8", "vp9", "mjpeg", "av1", "mpeg4")


def device_problem(loader: str, device: str, cuda: bool) -> Optional[str]:
    """Why this loader/device pair cannot run on this machine, or None."""
    if loader == "dali" and device == "gpu" and not cuda:
        return ("data.device=gpu: DALI's GPU decoder needs CUDA, and this machine has none; use "
                "data.loader=pyav, or data.device=cpu with VP9 shards (data_prep --codec vp9)")
    return None


def codec_problem(codec: str, loader: str, device: str, where: str) -> Optional[str]:
    """Why the loader cannot decode `codec` (the codec of `where`, e.g. "split 'val' (.../val-index.json)"),
    naming the fixes; None when it can."""
    if loader != "dali":
        return None
    codec = (codec or "").lower()
    if device == "cpu" and codec not in DALI_CPU_CODECS:
        return (f"data.loader=dali data.device=cpu cannot decode {where}: it is {codec or 'of unknown codec'}, "
                f"and DALI's CPU decoder reads only {', '.join(DALI_CPU_CODECS)}. Use data.loader=pyav, or "
                f"data.device=gpu on a GPU machine, or re-encode the split with --codec vp9 (python -m "
                f"data_prep.shard / data_prep.synthetic)")
    if device == "gpu" and codec not in DALI_GPU_CODECS:
        return (f"data.loader=dali data.device=gpu cannot decode {where}: it is {codec or 'of unknown codec'}, "
                f"and DALI's GPU decoder reads {', '.join(DALI_GPU_CODECS)}. Use data.loader=pyav, or re-encode "
                f"the split with --codec h264 (python -m data_prep.shard)")
    return None
