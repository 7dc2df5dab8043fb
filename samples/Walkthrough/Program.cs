using System;
using static TorchSharp.torch;
var w = tensor(new float[] { 1, 2, 3, 4, 5, 6 }).reshape(2, 3);
var x = tensor(new float[] { 1, 2, 3 });
Console.WriteLine(string.Join(",", TorchSharp.torch.nn.functional.linear(x, w, tensor(new float[] { 0, 1 })).data<float>().ToArray()));
