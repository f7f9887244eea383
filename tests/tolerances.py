"""Every tolerance the tests use, in one place, with the reason beside any loosened one."""

FP32 = dict(atol=1e-4, rtol=1e-4)  # fp32 end to end
FP64 = dict(atol=1e-10, rtol=1e-10)  # the float64 decomposition path
# An SVD in float32 of products whose entries are O(1): relative to the product's norm.
FP32_FACTOR_REL = 1e-5
# A pure tone through a band-limited resampler (soxr) keeps its energy to well within 1%.
RESAMPLED_RMS_REL = 1e-2
# The same float32 computation on differently aligned buffers (BLAS may pick other kernels): last bits only.
SAME_MATH = dict(atol=1e-6, rtol=1e-5)
# ... then rounded to float16 (a last-bit difference in float32 can round to the neighbouring float16).
SAME_MATH_FP16 = dict(atol=1e-5, rtol=1e-3)
# A ratio-0 model is the original up to float32 rounding; a perplexity near 55,000 shown with two
# decimals can then differ from the original's in its last digit (depending on which BLAS kernels ran).
SHOWN_RATIO0_REL = 1e-6
# The error a calibrated prune makes on its own statistics equals the oracle's tail of whitened singular
# values: float64 whitening, float32 factors (their rounding, relative to the product's norm).
CALIBRATED_REL = 1e-4
# Folding a norm's gain adds 1e-6 of the mean diagonal as damping (a guard against zero gains), so the
# folded error matches the exact fold to about that share of the spectrum.
NORM_FOLD_REL = 1e-3
