using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>How a port holds and invokes its projections: the ways TorchSharp ports are written.</summary>
    public enum PortStyle
    {
        /// <summary>Fields of TorchSharp's sealed Linear, invoked with call(x): the adapter runs in a forward hook.</summary>
        LinearCall,

        /// <summary>Fields of TorchSharp's sealed Linear, invoked with forward(x), which runs no hooks: the adapter cannot run.</summary>
        LinearForward,

        /// <summary>Fields typed nn.Module&lt;Tensor, Tensor&gt; holding Linear layers, invoked with forward(x) (as Microsoft.ML.GenAI's models do).</summary>
        ModuleForward,

        /// <summary>Fields of CustomLinear, invoked with forward(x).</summary>
        CustomForward,
    }

    /// <summary>
    /// .NET ports of make_peft_adapters.py's models (ReferenceData/Peft), written each way a port is written, and the
    /// files real PEFT 0.18.1 wrote through that script.
    /// </summary>
    internal static class Ports
    {
        public static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Peft");

        public static Sequential Mlp() => nn.Sequential(("0", nn.Linear(16, 32)), ("1", nn.ReLU()), ("2", nn.Linear(32, 8)));

        public static nn.Module<Tensor, Tensor> Port(string adapter, PortStyle style = PortStyle.LinearCall) => adapter switch
        {
            "mlp" or "dora_stack" => Mlp(),
            "embedding" => new EmbedModel(style),
            _ => new Classifier(style),
        };

        /// <summary>The port with the pretrained weights make_peft_adapters.py started from, in eval mode.</summary>
        public static nn.Module<Tensor, Tensor> Pretrained(string adapter, PortStyle style = PortStyle.LinearCall)
        {
            var model = Port(adapter, style);
            StateDicts.LoadPyTorchFile(model, Path.Combine(Folder, adapter, "base.safetensors"));
            model.eval();
            return model;
        }

        /// <summary>The inputs and outputs PyTorch recorded for an adapter folder (the caller disposes them).</summary>
        public static Dictionary<string, Tensor> Cases(string adapter) => StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "cases.safetensors"));

        public static Tensor Run(nn.Module<Tensor, Tensor> model, Tensor x)
        {
            using var _ = no_grad();
            return model.call(x);
        }

        /// <summary>Every state_dict entry's bits, to show a model unchanged.</summary>
        public static Dictionary<string, string[]> Bits(nn.Module model)
        {
            var bits = new Dictionary<string, string[]>();
            foreach (var (key, tensor) in model.state_dict())
                bits[key] = TorchLinear.Tests.TensorText.Bits(tensor);
            return bits;
        }

        private static Tensor Attend(Tensor q, Tensor k, Tensor v, Func<Tensor, Tensor> output)
        {
            using var scope = NewDisposeScope();
            var weights = (q[TensorIndex.Ellipsis, TensorIndex.Slice(0, 8)].matmul(k.transpose(-2, -1)) / Math.Sqrt(8)).softmax(-1);
            return output(weights.matmul(v)).MoveToOuterDisposeScope();
        }

        /// <summary>q/k/v/o projections in fields of TorchSharp's sealed Linear.</summary>
        internal sealed class LinearAttention : nn.Module<Tensor, Tensor>
        {
            private readonly Linear q_proj = nn.Linear(24, 24), k_proj = nn.Linear(24, 8), v_proj = nn.Linear(24, 8), o_proj = nn.Linear(8, 24);
            private readonly bool _viaForward;

            public LinearAttention(bool viaForward) : base("SelfAttention")
            {
                _viaForward = viaForward;
                RegisterComponents();
            }

            private Tensor Run(Linear layer, Tensor x) => _viaForward ? layer.forward(x) : layer.call(x);

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                return Attend(Run(q_proj, x), Run(k_proj, x), Run(v_proj, x), h => Run(o_proj, h)).MoveToOuterDisposeScope();
            }
        }

        /// <summary>q/k/v/o projections in fields typed nn.Module&lt;Tensor, Tensor&gt;, invoked with forward(x).</summary>
        internal sealed class ModuleAttention : nn.Module<Tensor, Tensor>
        {
            private readonly nn.Module<Tensor, Tensor> q_proj = nn.Linear(24, 24), k_proj = nn.Linear(24, 8), v_proj = nn.Linear(24, 8), o_proj = nn.Linear(8, 24);

            public ModuleAttention() : base("SelfAttention") => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                return Attend(q_proj.forward(x), k_proj.forward(x), v_proj.forward(x), h => o_proj.forward(h)).MoveToOuterDisposeScope();
            }
        }

        /// <summary>q/k/v/o projections in fields of CustomLinear, invoked with forward(x).</summary>
        internal sealed class CustomAttention : nn.Module<Tensor, Tensor>
        {
            private readonly CustomLinear q_proj = new(24, 24), k_proj = new(24, 8), v_proj = new(24, 8), o_proj = new(8, 24);

            public CustomAttention() : base("SelfAttention") => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                return Attend(q_proj.forward(x), k_proj.forward(x), v_proj.forward(x), h => o_proj.forward(h)).MoveToOuterDisposeScope();
            }
        }

        internal sealed class Layer : nn.Module<Tensor, Tensor>
        {
            private readonly nn.Module<Tensor, Tensor> self_attn;

            public Layer(PortStyle style) : base(nameof(Layer))
            {
                self_attn = style switch
                {
                    PortStyle.LinearCall => new LinearAttention(viaForward: false),
                    PortStyle.LinearForward => new LinearAttention(viaForward: true),
                    PortStyle.ModuleForward => new ModuleAttention(),
                    _ => new CustomAttention(),
                };
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => x + self_attn.call(x);
        }

        internal sealed class Inner : nn.Module<Tensor, Tensor>
        {
            private readonly ModuleList<Layer> layers;

            public Inner(PortStyle style) : base(nameof(Inner))
            {
                layers = new ModuleList<Layer>(new Layer(style), new Layer(style));
                RegisterComponents();
            }

            public override Tensor forward(Tensor x)
            {
                foreach (var layer in layers)
                    x = layer.call(x);
                return x;
            }
        }

        /// <summary>model.layers.N.self_attn.{q,k,v,o}_proj, then a classifier head on the mean over time.</summary>
        internal sealed class Classifier : nn.Module<Tensor, Tensor>
        {
            private readonly Inner model;
            private readonly Linear classifier = nn.Linear(24, 3);

            public Classifier(PortStyle style = PortStyle.LinearCall) : base(nameof(Classifier))
            {
                model = new Inner(style);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => classifier.call(model.call(x).mean(new long[] { -2 }));
        }

        /// <summary>make_peft_breadth.py's EmbedModel: emb (an Embedding), fc and head; mean over the sequence.</summary>
        internal sealed class EmbedModel : nn.Module<Tensor, Tensor>
        {
            // LinearCall: fields of the sealed types, invoked with call(x) (the adapters run in hooks); ModuleForward:
            // fields typed for any module, invoked with forward(x) (the layers are wrapped, the fields then hold the wrappers).
            private readonly Embedding? _sealedEmb;
            private readonly Linear? _sealedFc;
            private readonly nn.Module<Tensor, Tensor>? _anyEmb, _anyFc;
            private readonly Linear _head = nn.Linear(12, 4);

            public EmbedModel(PortStyle style = PortStyle.LinearCall) : base(nameof(EmbedModel))
            {
                if (style == PortStyle.ModuleForward)
                {
                    _anyEmb = nn.Embedding(10, 12);
                    _anyFc = nn.Linear(12, 12);
                    register_module("emb", _anyEmb);
                    register_module("fc", _anyFc);
                }
                else
                {
                    _sealedEmb = nn.Embedding(10, 12);
                    _sealedFc = nn.Linear(12, 12);
                    register_module("emb", _sealedEmb);
                    register_module("fc", _sealedFc);
                }
                register_module("head", _head);
            }

            protected override void RegisterComponents()
            {
            }

            public override Tensor forward(Tensor idx)
            {
                using var scope = NewDisposeScope();
                Tensor e = _anyEmb is not null ? _anyEmb.forward(idx) : _sealedEmb!.call(idx);
                Tensor h = (_anyFc is not null ? _anyFc.forward(e) : _sealedFc!.call(e)).tanh();
                return _head.call(h).mean(new long[] { -2 }).MoveToOuterDisposeScope();
            }
        }
    }
}
