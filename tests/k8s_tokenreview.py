"""Old import path of `support.k8s_tokenreview`, for test files not moved to it yet."""

from __future__ import annotations

from support.k8s_tokenreview import TokenReviewServer as TokenReviewServer
