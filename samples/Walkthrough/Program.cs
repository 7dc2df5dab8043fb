using System;
using TorchSharp;
using static TorchSharp.torch;
try { var l = nn.Linear(0, 4); Console.WriteLine("nn.Linear(0,4) ok " + string.Join(",", l.bias!.data<float>().ToArray())); } catch (Exception e) { Console.WriteLine("nn.Linear(0,4): " + e.Message.Split('\n')[0]); }
try { var l = nn.Linear(4, 0); Console.WriteLine("nn.Linear(4,0) ok " + l.weight.numel()); } catch (Exception e) { Console.WriteLine("nn.Linear(4,0): " + e.Message.Split('\n')[0]); }
try { var w = empty(4, 0); nn.init.kaiming_uniform_(w, a: Math.Sqrt(5)); Console.WriteLine("kaiming empty ok"); } catch (Exception e) { Console.WriteLine("kaiming(4,0): " + e.Message.Split('\n')[0]); }
try { var b = empty(4); nn.init.uniform_(b, -0.0, 0.0); Console.WriteLine("uniform(-0,0) ok " + string.Join(",", b.data<float>().ToArray())); } catch (Exception e) { Console.WriteLine("uniform: " + e.Message.Split('\n')[0]); }
try { var b = empty(4); b.uniform_(-0.0, 0.0); Console.WriteLine("tensor.uniform_(-0,0) ok " + string.Join(",", b.data<float>().ToArray())); } catch (Exception e) { Console.WriteLine("t.uniform: " + e.Message.Split('\n')[0]); }
try { var b = empty(0); Console.WriteLine("data of empty: " + b.data<float>().ToArray().Length); } catch (Exception e) { Console.WriteLine("data empty: " + e.GetType()+ e.Message.Split('\n')[0]); }
var lin = nn.Linear(3, 2);
try { var y = lin.forward(empty(4, 3, device: new Device(DeviceType.META))); Console.WriteLine("meta 2-D: " + y.device); } catch (Exception e) { Console.WriteLine("meta 2D: " + e.Message.Split('\n')[0]); }
try { var y = lin.forward(empty(2, 4, 3, device: new Device(DeviceType.META))); Console.WriteLine("meta 3-D: " + y.device); } catch (Exception e) { Console.WriteLine("meta 3D: " + e.Message.Split('\n')[0]); }
