"""In-context linear regression with multi-head softmax attention (He et al., ICML 2025)."""
