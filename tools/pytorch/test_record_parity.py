"""Tests of record's and record_training's refusals and of what they record. Python is not needed by the .NET tests or CI; run these
by hand when record_parity.py changes, with any torch >= 1.13:
    /usr/bin/python3 -m unittest tools/pytorch/test_record_parity.py"""
import copy
import json
import os
import sys
import tempfile
import unittest

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record_parity import record, record_training  # noqa: E402


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


class InPlace(torch.nn.Module):
    """An in-place ReLU and an in-place Hardswish (which change their input tensor), each after a Linear."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc2 = torch.nn.Linear(4, 4)
        self.hardswish = torch.nn.Hardswish(inplace=True)

    def forward(self, x):
        return self.hardswish(self.fc2(self.relu(self.fc(x))))


class Pair(torch.nn.Module):
    def forward(self, x):
        return x * 2, (x + 1, None, 3)


class Named(torch.nn.Module):
    def forward(self, x):
        return {"doubled": x * 2, "count": torch.tensor([x.numel()]), "none": None}


class Scaled(torch.nn.Module):
    """Called with keyword tensors, as transformers calls its layers."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, scale=None, position_embeddings=None, flag=True):
        cos, sin = position_embeddings
        return self.fc(hidden_states) * scale + cos - sin


class Structures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = Pair()
        self.named = Named()
        self.scaled = Scaled()

    def forward(self, x):
        a, (b, _, _) = self.pair(x)
        d = self.named(a)["doubled"]
        return self.scaled(b, scale=d, position_embeddings=(x.cos(), x.sin()), flag=False) + a


class Tied(torch.nn.Module):
    """OPT's layout: lm_head.weight is embed.weight."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.fc(self.embed(ids))))


class Float32Only(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        if self.fc.weight.dtype != torch.float32:
            raise RuntimeError(f"Float32Only runs in float32 only, not {self.fc.weight.dtype}")
        return self.fc(x)


class Failing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        raise RuntimeError("the forward failed")


def load(path):
    data = torch.load(path)
    return data, json.loads(bytes(data["metadata"].tolist()))


class RecordTests(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.path = os.path.join(tempfile.mkdtemp(), "run.parity.pt")

    def test_an_in_place_module_records_its_input_before_it_ran(self):
        model = InPlace().eval()
        x = torch.randn(6, 4)
        record(model, x, self.path)
        data, metadata = load(self.path)
        fc_out = data["call/fc/output/0"]
        self.assertLess(float(fc_out.min()), 0)  # the ReLU has negatives to clear, so input and output differ
        self.assertTrue(torch.equal(data["call/relu/input/0"], fc_out))
        self.assertTrue(torch.equal(data["call/relu/output/0"], fc_out.clamp(min=0)))
        fc2_out = data["call/fc2/output/0"]
        self.assertTrue(torch.equal(data["call/hardswish/input/0"], fc2_out))
        self.assertTrue(torch.equal(data["call/hardswish/output/0"], torch.nn.functional.hardswish(fc2_out)))
        self.assertFalse(torch.equal(data["call/hardswish/output/0"], fc2_out))
        self.assertEqual(metadata["call_order"], ["fc", "relu", "fc2", "hardswish", ""])
        self.assertEqual(metadata["call_start_order"], ["", "fc", "relu", "fc2", "hardswish"])

    def test_tuple_and_dict_outputs_and_keyword_tensors_are_recorded_tensor_by_tensor_with_names(self):
        model = Structures().eval()
        x = torch.randn(2, 4)
        record(model, x, self.path)
        data, metadata = load(self.path)
        self.assertEqual(metadata["calls"]["pair"], {"inputs": ["0"], "outputs": ["0", "1.0"]})
        self.assertTrue(torch.equal(data["call/pair/output/0"], x * 2))
        self.assertTrue(torch.equal(data["call/pair/output/1"], x + 1))
        self.assertEqual(metadata["calls"]["named"], {"inputs": ["0"], "outputs": ["doubled", "count"]})
        self.assertTrue(torch.equal(data["call/named/output/1"], torch.tensor([8])))
        self.assertEqual(metadata["calls"]["scaled"]["inputs"],
                         ["0", "scale", "position_embeddings.0", "position_embeddings.1"])
        self.assertTrue(torch.equal(data["call/scaled/input/0"], x + 1))
        self.assertTrue(torch.equal(data["call/scaled/input/1"], x * 4))
        self.assertTrue(torch.equal(data["call/scaled/input/2"], x.cos()))
        self.assertTrue(torch.equal(data["call/scaled/input/3"], x.sin()))
        self.assertNotIn("call/scaled/input/4", data)
        self.assertEqual(metadata["calls"]["scaled.fc"], {"inputs": ["0"], "outputs": ["0"]})
        self.assertEqual(metadata["calls"][""], {"inputs": ["0"], "outputs": ["0"]})
        self.assertEqual(metadata["module_types"]["named"], "Named")

    def test_the_output_index_chooses_the_root_output_that_is_differentiated(self):
        model = Pair()
        x = torch.randn(3)
        metadata = record(model, x, self.path, output_index=1)
        data, _ = load(self.path)
        self.assertEqual(metadata["output_index"], 1)
        self.assertTrue(torch.equal(data["grad/input/0"], torch.ones(3)))  # d(x + 1).sum()/dx, not 2
        with self.assertRaisesRegex(ValueError, r"output_index 2 is out of range: Pair returned 2 tensors \(0, 1.0\)"):
            record(model, x, self.path, output_index=2)

    def test_a_tied_parameter_has_its_gradient_under_both_names(self):
        model = Tied().eval()
        ids = torch.tensor([[1, 2, 3], [3, 4, 1]])
        metadata = record(model, ids, self.path)
        data, _ = load(self.path)
        self.assertEqual(metadata["parameters"], ["embed.weight", "fc.weight", "fc.bias", "lm_head.weight"])
        self.assertEqual(metadata["tied"], {"lm_head.weight": "embed.weight"})
        self.assertTrue(torch.equal(data["grad/param/lm_head.weight"], data["grad/param/embed.weight"]))
        self.assertTrue(torch.equal(data["state/lm_head.weight"], data["state/embed.weight"]))
        # The gradient is the sum of both uses: the embedding rows of unused ids get only the head's part.
        expected = torch.autograd.grad(model(ids).sum(), model.embed.weight)[0]
        self.assertTrue(torch.allclose(data["grad/param/embed.weight"], expected, rtol=0, atol=1e-6))
        self.assertGreater(float(data["grad/param/embed.weight"][0].abs().sum()), 0)  # id 0 unused: head only
        self.assertNotEqual(data["grad/param/embed.weight"].data_ptr(), data["grad/param/lm_head.weight"].data_ptr())
        self.assertNotIn("grad/input/0", data)  # integer input
        self.assertNotIn("call/embed/input/0", metadata["noise"])  # integer tensors have no noise
        self.assertIn("call/embed/output/0", metadata["noise"])
        self.assertEqual(metadata["noise"]["grad/param/lm_head.weight"], metadata["noise"]["grad/param/embed.weight"])

    def test_a_module_shared_between_two_paths_has_its_gradients_under_both(self):
        shared = torch.nn.Linear(3, 3)
        model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared).eval()
        metadata = record(model, torch.randn(2, 3), self.path)
        data, _ = load(self.path)
        self.assertEqual(metadata["parameters"], ["0.weight", "0.bias", "2.weight", "2.bias"])
        self.assertEqual(metadata["tied"], {"2.weight": "0.weight", "2.bias": "0.bias"})
        self.assertEqual(metadata["call_order"], ["0", "1", "0#1", ""])
        self.assertEqual(list(metadata["training"]), ["", "0", "1", "2"])
        expected = torch.autograd.grad(model(data["input/0"]).sum(), shared.weight)[0]
        for name in ["0.weight", "2.weight"]:
            self.assertTrue(torch.allclose(data[f"grad/param/{name}"], expected, rtol=0, atol=1e-6), name)

    def test_training_mode_dropout_and_batchnorm_are_refused_by_path(self):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.1)))
        model.train()
        with self.assertRaisesRegex(ValueError, r"1\.0 \(BatchNorm1d\), 1\.1 \(Dropout, p=0\.1\)"):
            record(model, torch.randn(4, 3), self.path)
        self.assertFalse(os.path.exists(self.path))
        model[1][1].p = 0.0
        with self.assertRaisesRegex(ValueError, r"modules in training mode .*: 1\.0 \(BatchNorm1d\)\. Call module.eval\(\)"):
            record(model, torch.randn(4, 3), self.path)
        running_mean = model[1][0].running_mean.clone()
        metadata = record(model, torch.randn(4, 3), self.path, allow_training=True)
        self.assertEqual(metadata["training"], {"": True, "0": True, "1": True, "1.0": True, "1.1": True})
        data, _ = load(self.path)
        self.assertTrue(torch.equal(data["state/1.0.running_mean"], running_mean))  # the state the run started from
        model.eval()
        metadata = record(model, torch.randn(4, 3), self.path)
        self.assertEqual(set(metadata["training"].values()), {False})

    def test_noise_is_present_non_negative_and_small_for_a_float32_model(self):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).eval()
        metadata = record(model, torch.randn(5, 16), self.path)
        data, _ = load(self.path)
        self.assertEqual(metadata["noise_reference"], "float64")
        self.assertIsNone(metadata["noise_unavailable"])
        floating = {k for k, v in data.items() if k.startswith(("call/", "grad/")) and v.is_floating_point()}
        self.assertEqual(set(metadata["noise"]), floating)
        for key, value in metadata["noise"].items():
            scale = float(data[key].abs().max())
            self.assertGreaterEqual(value, 0.0, key)
            self.assertLessEqual(value, 1e-5 * max(scale, 1.0), key)
        self.assertEqual(metadata["noise"]["call/0/input/0"], 0.0)  # the input itself is exact in float64
        self.assertGreater(metadata["noise"]["call//output/0"], 0.0)  # a 16- and 32-term sum rounds somewhere
        # Against a float64 run made here: the recorded noise is |float32 - float64|.
        model64 = copy.deepcopy(model).double()
        expected = (model(data["input/0"]).double() - model64(data["input/0"].double())).abs().max()
        self.assertEqual(metadata["noise"]["call//output/0"], float(expected))

    def test_the_float64_run_leaves_the_module_unchanged(self):
        model = Tied().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        record(model, torch.tensor([[1, 2]]), self.path)
        after = model.state_dict()
        self.assertEqual(list(before), list(after))
        for key in before:
            self.assertEqual(after[key].dtype, torch.float32, key)
            self.assertTrue(torch.equal(before[key], after[key]), key)
        self.assertIs(model.lm_head.weight, model.embed.weight)
        for p in model.parameters():
            self.assertIsNone(p.grad)

    def test_a_model_that_cannot_run_in_float64_is_recorded_without_noise_and_a_warning(self):
        with self.assertWarnsRegex(UserWarning, "no float64 reference run for Float32Only .*runs in float32 only, not torch.float64"):
            metadata = record(Float32Only(), torch.randn(2, 3), self.path)
        self.assertIsNone(metadata["noise_reference"])
        self.assertIn("RuntimeError: Float32Only runs in float32 only", metadata["noise_unavailable"])
        self.assertEqual(metadata["noise"], {})
        data, _ = load(self.path)
        self.assertIn("call/fc/output/0", data)

    def test_reference64_false_records_no_noise(self):
        metadata = record(torch.nn.Linear(3, 3), torch.randn(2, 3), self.path, reference64=False)
        self.assertIsNone(metadata["noise_reference"])
        self.assertIsNone(metadata["noise_unavailable"])
        self.assertEqual(metadata["noise"], {})

    def test_a_dtype_dependent_constant_is_left_out_of_the_noise(self):
        class Masked(torch.nn.Module):
            def forward(self, x):
                return torch.full_like(x, torch.finfo(x.dtype).min).triu(1) + x

        metadata = record(Masked(), torch.randn(3, 3), self.path)
        self.assertEqual(metadata["noise"]["call//output/0"], 0.0)

    def test_the_forward_wrappers_are_removed_afterwards_also_when_the_forward_raises(self):
        model = Structures().eval()
        record(model, torch.randn(2, 4), self.path)
        for name, m in model.named_modules():
            self.assertNotIn("forward", m.__dict__, name)
        failing = torch.nn.Sequential(torch.nn.Linear(3, 3), Failing())
        other = self.path.replace("run.", "failed.")
        with self.assertRaisesRegex(RuntimeError, "the forward failed"):
            record(failing, torch.randn(2, 3), other)
        for name, m in failing.named_modules():
            self.assertNotIn("forward", m.__dict__, name)
        self.assertFalse(os.path.exists(other))

    def test_an_own_forward_attribute_is_restored(self):
        model = torch.nn.Linear(3, 3)
        own = model.forward
        model.forward = lambda x: own(x) * 2
        patched = model.forward
        record(model, torch.randn(2, 3), self.path, reference64=False)  # the lambda would run the float32 original
        self.assertIs(model.__dict__["forward"], patched)

    def test_a_module_called_twice_is_recorded_as_path_and_path_1(self):
        act = torch.nn.Tanh()
        model = torch.nn.Sequential(act, torch.nn.Linear(3, 3), act)
        metadata = record(model, torch.randn(2, 3), self.path)
        self.assertEqual(metadata["call_order"], ["0", "1", "0#1", ""])
        self.assertEqual(metadata["call_start_order"], ["", "0", "1", "0#1"])
        self.assertEqual(metadata["training"], {"": True, "0": True, "1": True, "2": True})


if __name__ == "__main__":
    unittest.main()
