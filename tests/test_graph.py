"""The graph as data: its derived arrays (distances, band, feasibility) against the paths
themselves, for every topology."""
import pytest
import torch
from conftest import random_batch
from oracle import state_paths

from ctclab._inputs import ctc_batch
from ctclab.graph import ADVANCE, SKIP, STAY, TOPOLOGIES, CTCGraph
from ctclab.trellis import state_posteriors


def graph_of(T, targets, topology):
    lp = torch.zeros(T, 1, 4)
    return CTCGraph.build(ctc_batch(lp, torch.tensor([targets]), [T], [len(targets)]), topology)


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("targets", [[1], [1, 1], [1, 2, 2], [2, 2, 1]])
def test_band_min_frames_and_feasibility_against_every_path(topology, targets):
    shortest = None
    for T in range(1, 7):
        graph = graph_of(T, targets, topology)
        paths, _ = state_paths(T, targets, topology)
        occupied = {(t, s) for path in paths for t, s in enumerate(path)}
        band = graph.band(T)[0]
        for t, s in occupied:  # every state a complete path visits lies in the band
            assert band[t, 0] <= s < band[t, 1], (T, t, s, band[t].tolist())
        assert bool(graph.feasible[0]) == bool(paths)
        if paths and shortest is None:
            shortest = T
        assert int(graph.min_frames[0]) == shortest or (shortest is None and int(graph.min_frames[0]) > T)


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_states_outside_the_band_have_no_posterior(topology):
    logits, targets, il, tl = random_batch(20, 5, 6, 6, seed=3, repeats=True, dtype=torch.float64)
    graph = CTCGraph.build(ctc_batch(logits.log_softmax(-1), targets, il, tl), topology)
    gamma = state_posteriors(graph, graph.emissions(logits.log_softmax(-1)))  # (T, B, S)
    band = graph.band(20).transpose(0, 1)  # (T, B, 2)
    states = torch.arange(gamma.shape[2])
    outside = (states < band[..., :1]) | (states >= band[..., 1:])
    assert (gamma[outside] == 0).all()
    assert (gamma[~outside].sum() > 0)


def test_moves_are_the_topologies_rules():
    graph = graph_of(6, [1, 1, 2], "standard")
    allowed = graph.moves[:, 0] > -torch.inf  # (3, S): skip, advance, stay into each state
    assert allowed[SKIP].tolist() == [False, False, False, False, False, True, False]  # only into the 2 after 1
    assert allowed[ADVANCE].all() and allowed[STAY].all()
    selfless = graph_of(6, [1, 1, 2], "selfless").moves[:, 0] > -torch.inf
    assert selfless[STAY].tolist() == [True, False, True, False, True, False, True]
    minimal = graph_of(6, [1, 1, 2], "minimal").moves[:, 0] > -torch.inf
    assert minimal[SKIP].tolist() == [False, False, False, True, False, True, False]
    padded = CTCGraph.build(ctc_batch(torch.zeros(6, 2, 4), torch.tensor([[1, 2], [3, 0]]), [6, 6], [2, 1]))
    assert (padded.moves[:, 1, 3:] == -torch.inf).all()  # item 1 has 3 states: none into its padding
