"""LAIC-RS component 1: cross-modal relations as self-supervision (ALGORITHM.md section 5).

What the paper says (abstract only; no code is public): the per-image text features of TAC-style
methods are nearly identical across classes, so LAIC-RS derives "more discriminative
self-supervision signals" from cross-modal *relations*; a third-party summary adds that the
relation matrix comes from ridge regression reconstructing one modality from the other. The
formulas below are OUR READING, not the paper's; every choice is a switch so its effect can be
measured (benchmarks/methods.py, issue 12).

Relation vectors (image -> nouns). With U (N, d) unit image features and S (M, d) the selected
noun embeddings, the relation vector r_i of image i reconstructs it from the nouns by ridge
regression:

    r_i = argmin_r ||u_i - S^T r||^2 + lambda ||r||^2  =  (S S^T + lambda I_M)^{-1} S u_i,
    R   = U S^T (S S^T + lambda I_M)^{-1}                                   (N, M)

The M x M Gram system is factored once (Cholesky; SPD for lambda > 0) and every chunk of images
costs two matrix products, so R streams over N on a GPU with O(chunk x M) memory. Unlike the
softmax-weighted counterparts (`counterparts.retrieve_counterparts`), which put every image near
the same few dominant nouns, the ridge solution explains u_i jointly by all nouns: correlated
nouns compete instead of all voting for one direction. `center=True` first removes the mean
image and the mean noun (CLIP's modality gap is a shared offset that otherwise dominates every
relation).

Self-supervision from R (the choice, and why). Two uses were candidates: (a) neighbours in
relation space, fed to the same consistency loss and samplers as TAC's/SEIC's image and text
neighbours; (b) a batch affinity target softmax(cos(r_i, r_j)/tau) for the assignments' inner
products P P^T. We take (a): it reuses the tested neighbour tables and samplers, costs
O(N x k) memory instead of a B x B target per step, and is exact over the whole corpus rather
than within a batch. `relation_neighbours` gives them; (b) can be added behind the same switch
if the measurements ask for it.

`cross_class_cosine` measures the paper's claim (i) as a number: the mean cosine between
features of different classes (lower = more discriminative), computed in O(N d) from class sums.

Measured (synthetic vMF features, `make_vmf_features(n=600, n_clusters=6, dim=64)`, TAC's 90
selected nouns, `center=True`; tests/method/test_relations.py checks the second setting):

    image_kappa  image kNN   TAC counterpart kNN   relation kNN (ridge 1 / 3 / 10 / 100)
    60           0.997       0.980                 0.994 / 0.999 / 1.000 / 0.999
    30           0.767       0.750                 0.706 / 0.871 / 0.918 / 0.912

(kNN: fraction of the 10 nearest neighbours sharing the class.) Cross-class cosine at kappa 30:
TAC counterparts 0.184, relation features -0.069 (ridge 10). A small ridge over-fits each image
with the many nouns (M > d): the default ridge is 10 (with unit nouns, the Gram matrix's mean
eigenvalue is 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayclust.method.neighbours import knn


def ridge_relations(u: torch.Tensor, nouns: torch.Tensor, ridge: float = 10.0,
                    center: bool = False, chunk_size: int = 65536) -> torch.Tensor:
    """R = U S^T (S S^T + ridge I)^{-1}: each image's ridge reconstruction weights over the nouns.

    u (N, d), nouns (M, d) on the same device. Returns (N, M) in u's dtype. The Gram matrix is
    solved in float64 (it is M x M, small) so a small `ridge` stays accurate in float32 runs.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (got {ridge}): S S^T is singular when M > d")
    if center:
        u = u - u.mean(dim=0, keepdim=True)
        nouns = nouns - nouns.mean(dim=0, keepdim=True)
    s = nouns.double()
    gram = s @ s.T + ridge * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    factor = torch.linalg.cholesky(gram)
    out = torch.empty(u.shape[0], nouns.shape[0], dtype=u.dtype, device=u.device)
    for start in range(0, u.shape[0], chunk_size):
        rhs = (u[start:start + chunk_size].double() @ s.T).T  # (M, chunk)
        out[start:start + chunk_size] = torch.cholesky_solve(rhs, factor).T.to(u.dtype)
    return out


def relation_features(u: torch.Tensor, nouns: torch.Tensor, ridge: float = 10.0,
                      center: bool = False) -> torch.Tensor:
    """Unit-length relation vectors, the space relational neighbours are searched in."""
    return F.normalize(ridge_relations(u, nouns, ridge, center), dim=1)


def relation_neighbours(u: torch.Tensor, nouns: torch.Tensor, k: int, ridge: float = 10.0,
                        center: bool = False) -> torch.Tensor:
    """(N, k) indices of each image's nearest images by the cosine of their relation vectors."""
    return knn(relation_features(u, nouns, ridge, center), k)


def cross_class_cosine(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cos(x_i, x_j) over all pairs i != j of different classes, from class sums.

    With unit rows, sum_{i,j} cos = ||sum_i x_i||^2 and, within class c, ||sum_{i in c} x_i||^2;
    the cross-class pairs are the difference. O(N d), no N x N matrix.
    """
    x = F.normalize(x.double(), dim=1)
    classes, index = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, index, x)
    counts = torch.bincount(index, minlength=len(classes)).double()
    total = x.sum(dim=0)
    cross_sum = total @ total - (sums * sums).sum()
    cross_pairs = counts.sum() ** 2 - (counts * counts).sum()
    if cross_pairs == 0:
        raise ValueError("cross_class_cosine needs at least two classes")
    return float(cross_sum / cross_pairs)
