"""Branch specialization analysis of trained SAEs: statistics, null models, reports.

Pure functions over arrays (decoder [n_latents, d], branch slices from
:func:`branchlens.variants.branch_slices`, activations, provenance); the ``analyze(run_dir)``
stage that writes ``RUN/analysis/`` is :mod:`branchlens.stages.analyze` (``analyze`` here is a
re-export of it, kept for one release).
"""

from branchlens.analysis.activity import Activity, branch_attribution, latent_activity, top_images
from branchlens.analysis.branches import (
    NONE,
    BranchTest,
    analyze_branches,
    beta_approx_pvalues,
    branch_shares,
    dominant_branch,
    effective_dimension,
    enrichment,
    isotropic_pvalues,
    layer_table,
    null_controls,
    permutation_pvalues,
    ratio_null,
    scale_strata,
    std_normalise,
)
from branchlens.analysis.categories import (
    CATEGORIES,
    category,
    category_bootstrap,
    category_fractions,
    category_test,
    is_animal,
)
from branchlens.analysis.crosslayer import (
    align_rows,
    consistency,
    mutual_best_matches,
    shifted_rows,
)
from branchlens.analysis.driver import AnalysisConfig, format_table
from branchlens.analysis.embedding import embed_latents, knn_branch_agreement
from branchlens.analysis.stats import (
    agreement_permutation_test,
    bh_reject,
    cohen_kappa,
    mann_whitney,
)

__all__ = [
    "NONE", "Activity", "AnalysisConfig", "BranchTest", "CATEGORIES", "agreement_permutation_test",
    "align_rows", "analyze", "analyze_branches", "beta_approx_pvalues", "mutual_best_matches",
    "shifted_rows",
    "bh_reject", "branch_attribution", "branch_shares", "category", "category_fractions",
    "category_bootstrap", "category_test", "cohen_kappa", "consistency", "dominant_branch",
    "effective_dimension",
    "embed_latents", "enrichment", "format_table", "is_animal", "isotropic_pvalues",
    "knn_branch_agreement", "latent_activity", "layer_table", "mann_whitney", "null_controls",
    "permutation_pvalues", "ratio_null", "scale_strata", "std_normalise", "top_images",
]


def __getattr__(name: str):
    if name == "analyze":  # lazy: the stage imports this package
        from branchlens.stages.analyze import analyze  # moved; kept for one release

        return analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
