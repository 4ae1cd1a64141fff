"""The per-user Triton model's own cost, without a server: load time and generation latency.

Runs `model_code/triton_sd/1/model.py`'s `TritonPythonModel` in this process the way Triton's
Python backend would (same `initialize` arguments, same `generate`), on CUDA in float16 when
there is a GPU, else on the CPU. Writes JSON:

    python benchmarks/triton_model_direct.py --lora DIR --out outputs/benchmarks/model.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "model_code" / "triton_sd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lora", required=True, help="Folder with pytorch_lora_weights.safetensors."
    )
    parser.add_argument("--base-model", default=str(ROOT / "assets" / "tiny-sd-shapes"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from helpers.services.packaging import load_model_code

    module = load_model_code(MODEL_DIR / "1" / "model.py")

    with tempfile.TemporaryDirectory() as repository:
        version = Path(repository) / "1"
        version.mkdir()
        weights = Path(args.lora) / "pytorch_lora_weights.safetensors"
        (version / weights.name).write_bytes(weights.read_bytes())
        config = {
            "parameters": {
                "base_model": {"string_value": args.base_model},
                "default_guidance_scale": {"string_value": "2.0"},
            }
        }
        model = module.TritonPythonModel()
        started = time.perf_counter()
        model.initialize(
            {
                "model_config": json.dumps(config),
                "model_repository": repository,
                "model_version": "1",
            }
        )
        load_seconds = time.perf_counter() - started

        results = {}
        for steps, count in [(20, 1), (20, 4)]:
            values = module.parse_inputs(
                {
                    "prompt": [b"a photo of sks toy"],
                    "num_inference_steps": [steps],
                    "num_images": [count],
                },
                model.defaults,
            )
            model.generate(values)  # warm-up
            timings = []
            for _ in range(args.repeats):
                if model.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                images = model.generate(values)
                if model.device == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - started)
            assert len(images) == count
            results[f"steps{steps}_images{count}_seconds_median"] = round(
                statistics.median(timings), 4
            )
        report = {
            "machine": {
                "device": model.device,
                "gpu": torch.cuda.get_device_name() if model.device == "cuda" else None,
                "dtype": str(model.pipe.unet.dtype),
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            "load_seconds": round(load_seconds, 3),
            **results,
        }
        model.finalize()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
