using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>A new layer written on GuardedModule gets every after-Dispose guard without writing one.</summary>
    public class GuardedModuleTests
    {
        /// <summary>The smallest layer: one parameter, a forward that scales by it.</summary>
        public sealed class Scale : GuardedModule
        {
            private readonly Parameter factor;

            public Scale() : base(nameof(Scale))
            {
                factor = new Parameter(ones(1));
                RegisterComponents();
            }

            public override Tensor forward(Tensor input)
            {
                ThrowIfDisposed();
                return input * factor;
            }
        }

        public static IEnumerable<object[]> Uses() => new (string, Action<Scale>)[]
        {
            ("forward", m => m.forward(ones(2))),
            ("state_dict", m => m.state_dict()),
            ("load_state_dict", m => m.load_state_dict(new Dictionary<string, Tensor>())),
            ("named_parameters", m => m.named_parameters()),
            ("parameters", m => m.parameters()),
            ("named_buffers", m => m.named_buffers()),
            ("to(Float64)", m => m.to(ScalarType.Float64)),
            ("to(device)", m => m.to(DeviceType.CPU)),
        }.Select(u => new object[] { u.Item1, u.Item2 });

        [Theory]
        [MemberData(nameof(Uses))]
        public void AfterDispose_EveryUse_ThrowsObjectDisposed(string use, Action<Scale> action)
        {
            var layer = new Scale();
            layer.Dispose();
            Assert.Throws<ObjectDisposedException>(() => action(layer));
            _ = use;
        }

        [Fact]
        public void Save_AfterDispose_CreatesNoFile()
        {
            var layer = new Scale();
            layer.Dispose();
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-guarded-{Guid.NewGuid():N}.dat");
            Assert.Throws<ObjectDisposedException>(() => layer.save(file));
            Assert.False(File.Exists(file));
        }
    }
}
