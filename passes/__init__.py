"""Built-in passes of mgvq-compile, one per module (installed as ``mgvq_compile.passes``)."""

from mgvq_compile.passes.assign_bits import AssignBits, AssignBitsConfig
from mgvq_compile.passes.collect_stats import CollectStats, CollectStatsConfig
from mgvq_compile.passes.compensate import Compensate, CompensateConfig
from mgvq_compile.passes.fit_codebooks import FitCodebooks, FitCodebooksConfig
from mgvq_compile.passes.measure_distortion import MeasureDistortion, MeasureDistortionConfig
from mgvq_compile.passes.fuse_vq_gemm import FuseVQGemm, FuseVQGemmConfig
from mgvq_compile.passes.quantize_gptq import QuantizeGPTQ, QuantizeGPTQConfig
from mgvq_compile.passes.quantize_gptvq import QuantizeGPTVQ, QuantizeGPTVQConfig
from mgvq_compile.passes.quantize_kmeans_vq import QuantizeKMeansVQ, QuantizeKMeansVQConfig
from mgvq_compile.passes.quantize_rtn import QuantizeRTN, QuantizeRTNConfig

__all__ = [
    "AssignBits",
    "AssignBitsConfig",
    "Compensate",
    "CompensateConfig",
    "FitCodebooks",
    "FitCodebooksConfig",
    "CollectStats",
    "CollectStatsConfig",
    "FuseVQGemm",
    "FuseVQGemmConfig",
    "MeasureDistortion",
    "MeasureDistortionConfig",
    "QuantizeGPTQ",
    "QuantizeGPTQConfig",
    "QuantizeGPTVQ",
    "QuantizeGPTVQConfig",
    "QuantizeKMeansVQ",
    "QuantizeKMeansVQConfig",
    "QuantizeRTN",
    "QuantizeRTNConfig",
]
