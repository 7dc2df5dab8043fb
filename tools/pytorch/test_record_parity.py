"""Tests of record_training's refusals and of what it records. Python is not needed by the .NET tests or CI; run these
by hand when record_parity.py changes, with any torch >= 1.13:
    /usr/bin/python3 -m unittest tools/pytorch/test_record_parity.py"""
import json
import os
import sys
import tempfile
import unittest

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record_parity import record_training  # noqa: E402


def batch():
    return [(torch.randn(2, 3), torch.randn(2, 3))]


class FunctionalDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, training=self.training)


class RecordTrainingTests(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.path = os.path.join(tempfile.mkdtemp(), "run.training.pt")

    def record(self, model, optimizer=None, **kwargs):
        optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
        return record_training(model, optimizer, batch(), F.mse_loss, self.path, **kwargs)

    def test_active_dropout_module_is_refused_by_name(self):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1))
        with self.assertRaisesRegex(ValueError, r"1 \(Dropout, p=0.1\)"):
            self.record(model)
        self.assertFalse(os.path.exists(self.path))

    def test_attention_dropout_is_refused(self):
        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = torch.nn.MultiheadAttention(3, 1, dropout=0.2)

            def forward(self, x):
                return self.attn(x, x, x)[0]

        with self.assertRaisesRegex(ValueError, r"attn \(MultiheadAttention, p=0.2\)"):
            self.record(Attention())

    def test_functional_dropout_is_refused_by_the_rng_it_moves(self):
        with self.assertRaisesRegex(ValueError, "drew random numbers at step 0"):
            self.record(FunctionalDropout())
        self.assertFalse(os.path.exists(self.path))

    def test_dropout_with_p_0_is_recorded(self):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.0))
        metadata = self.record(model)
        self.assertEqual(metadata["format"], "torchlinear-training/1")

    def test_optimizer_holding_a_stranger_is_refused(self):
        model, other = torch.nn.Linear(3, 3), torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
        with self.assertRaisesRegex(ValueError, r"holds a tensor of shape \[2, 2\] that is not a parameter of the model"):
            self.record(model, optimizer)

    def test_what_a_step_records(self):
        model = torch.nn.Linear(3, 3)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.9))
        metadata = self.record(model, optimizer, max_grad_norm=0.5)
        data = torch.load(self.path)
        self.assertEqual(json.loads(bytes(data["metadata"].tolist())), metadata)
        self.assertEqual(metadata["groups"][0]["betas"], [0.8, 0.9])
        self.assertEqual(metadata["max_grad_norm"], 0.5)
        self.assertEqual(metadata["steps"][0]["optimizer_numbers"]["weight"], {"step": 1.0})
        for key in ["state/weight", "step/0/input", "step/0/target", "step/0/loss", "step/0/grad/weight",
                    "step/0/param/weight", "step/0/optim/weight/exp_avg", "step/0/optim/weight/exp_avg_sq",
                    "step/0/call//output"]:
            self.assertIn(key, data)
        # The gradients are recorded after clipping, the parameters after the step.
        grads = [data["step/0/grad/weight"], data["step/0/grad/bias"]]
        self.assertLessEqual(float(torch.norm(torch.stack([g.norm() for g in grads]))), 0.5 + 1e-6)
        self.assertTrue(torch.equal(data["step/0/param/weight"], model.weight.detach()))


if __name__ == "__main__":
    unittest.main()
