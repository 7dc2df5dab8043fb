using System;
using System.Buffers.Binary;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// A restricted unpickler for the <c>data.pkl</c> of a <c>torch.save</c> archive. Like PyTorch's
    /// <c>torch.load(weights_only=True)</c>, it never calls what a pickle names: it knows a short list of globals
    /// (<c>collections.OrderedDict</c>, <c>torch._utils._rebuild_tensor_v2</c> and its relatives, <c>torch.Size</c>,
    /// the storage classes) and builds plain descriptions from them; any other global is refused by name. Every length a
    /// pickle declares is checked against the bytes that remain, integers wider than 64 bits are refused, and each
    /// opcode consumes input, so the work is linear in the pickle's size.
    /// </summary>
    internal sealed class TorchPickle
    {
        /// <summary>A storage the pickle refers to by its persistent id: the archive entry <c>data/Key</c>.</summary>
        internal sealed record Storage(string Key, ScalarType DType, long Numel);

        /// <summary>A tensor: a view of <see cref="Storage"/> with offset, sizes and strides, as <c>as_strided</c> takes them.</summary>
        internal sealed record TensorView(Storage Storage, long Offset, long[] Size, long[] Stride);

        /// <summary>A dict or OrderedDict, in insertion order; setting an existing key replaces its value, as in Python.</summary>
        internal sealed class Dict
        {
            private readonly Dictionary<object, int> _index = new();
            internal List<KeyValuePair<object?, object?>> Items { get; } = new();

            internal void Set(object? key, object? value, Func<string, Exception> fail)
            {
                if (key is not (string or long or bool or double))
                    throw fail($"a dict key of type {TypeName(key)} is not read (only strings and numbers)");
                if (_index.TryGetValue(key, out int at))
                    Items[at] = new(key, value);
                else
                {
                    _index[key] = Items.Count;
                    Items.Add(new(key, value));
                }
            }
        }

        private sealed record Global(string Module, string Name);

        private const int MaxStackDepth = 100_000;

        private readonly byte[] _bytes;
        private readonly string _path;
        private readonly string _entry;
        private int _at;
        private int _opcodeAt;

        private TorchPickle(byte[] bytes, string path, string entry)
        {
            _bytes = bytes;
            _path = path;
            _entry = entry;
        }

        /// <summary>Unpickles <paramref name="bytes"/> (the archive entry <paramref name="entry"/> of <paramref name="path"/>).</summary>
        internal static object? Load(byte[] bytes, string path, string entry) => new TorchPickle(bytes, path, entry).Run();

        internal static string TypeName(object? value) => value switch
        {
            null => "None",
            string => "a string",
            long => "an integer",
            double => "a float",
            bool => "a bool",
            byte[] => "bytes",
            object[] => "a tuple",
            List<object?> => "a list",
            Dict => "a dict",
            TensorView => "a tensor",
            Storage => "a storage",
            Global g => $"{g.Module}.{g.Name}",
            _ => value.GetType().Name,
        };

        private object? Run()
        {
            var stack = new List<object?>();
            var marks = new Stack<int>();
            var memo = new Dictionary<long, object?>();
            while (true)
            {
                _opcodeAt = _at;
                byte opcode = Byte();
                switch (opcode)
                {
                    case 0x80: // PROTO
                        if (Byte() > 5)
                            throw Fail("unknown pickle protocol");
                        break;
                    case 0x95: // FRAME: a length hint only
                        Take(8);
                        break;
                    case (byte)'.': // STOP
                        if (stack.Count != 1 || marks.Count != 0)
                            throw Fail("the pickle stops with an unbalanced stack");
                        return stack[0];
                    case (byte)'(': // MARK
                        if (marks.Count >= MaxStackDepth)
                            throw Fail("too many nested marks");
                        marks.Push(stack.Count);
                        break;
                    case (byte)'}': Push(stack, new Dict()); break;
                    case (byte)']': Push(stack, new List<object?>()); break;
                    case (byte)')': Push(stack, Array.Empty<object?>()); break;
                    case (byte)'N': Push(stack, null); break;
                    case 0x88: Push(stack, true); break;
                    case 0x89: Push(stack, false); break;
                    case (byte)'K': Push(stack, (long)Byte()); break;
                    case (byte)'M': Push(stack, (long)BinaryPrimitives.ReadUInt16LittleEndian(Take(2))); break;
                    case (byte)'J': Push(stack, (long)BinaryPrimitives.ReadInt32LittleEndian(Take(4))); break;
                    case 0x8a: Push(stack, LittleEndianInteger(Take(Byte()))); break; // LONG1
                    case 0x8b: Push(stack, LittleEndianInteger(Take(Length(BinaryPrimitives.ReadInt32LittleEndian(Take(4)))))); break; // LONG4
                    case (byte)'G': Push(stack, BinaryPrimitives.ReadDoubleBigEndian(Take(8))); break;
                    case (byte)'X': Push(stack, Utf8(Take(Length(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))))); break; // BINUNICODE
                    case 0x8c: Push(stack, Utf8(Take(Byte()))); break; // SHORT_BINUNICODE
                    case (byte)'B': Push(stack, Take(Length(BinaryPrimitives.ReadInt32LittleEndian(Take(4)))).ToArray()); break; // BINBYTES
                    case (byte)'C': Push(stack, Take(Byte()).ToArray()); break; // SHORT_BINBYTES
                    case (byte)'T': Push(stack, Latin1(Take(Length(BinaryPrimitives.ReadInt32LittleEndian(Take(4)))))); break; // BINSTRING
                    case (byte)'U': Push(stack, Latin1(Take(Byte()))); break; // SHORT_BINSTRING
                    case (byte)'q': memo[Byte()] = Peek(stack); break; // BINPUT
                    case (byte)'r': memo[BinaryPrimitives.ReadUInt32LittleEndian(Take(4))] = Peek(stack); break; // LONG_BINPUT
                    case 0x94: memo[memo.Count] = Peek(stack); break; // MEMOIZE
                    case (byte)'h': Push(stack, Recall(memo, Byte())); break; // BINGET
                    case (byte)'j': Push(stack, Recall(memo, BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break; // LONG_BINGET
                    case (byte)'t': Push(stack, PopMark(stack, marks).ToArray()); break; // TUPLE
                    case 0x85: Push(stack, new[] { Pop(stack) }); break; // TUPLE1
                    case 0x86: { var b = Pop(stack); var a = Pop(stack); Push(stack, new[] { a, b }); break; } // TUPLE2
                    case 0x87: { var c = Pop(stack); var b = Pop(stack); var a = Pop(stack); Push(stack, new[] { a, b, c }); break; } // TUPLE3
                    case (byte)'l': Push(stack, PopMark(stack, marks)); break; // LIST
                    case (byte)'a': { var item = Pop(stack); AsList(Peek(stack)).Add(item); break; } // APPEND
                    case (byte)'e': { var items = PopMark(stack, marks); AsList(Peek(stack)).AddRange(items); break; } // APPENDS
                    case (byte)'d': // DICT
                    {
                        var items = PopMark(stack, marks);
                        var dict = new Dict();
                        SetItems(dict, items);
                        Push(stack, dict);
                        break;
                    }
                    case (byte)'s': { var value = Pop(stack); var key = Pop(stack); AsDict(Peek(stack)).Set(key, value, Fail); break; } // SETITEM
                    case (byte)'u': { var items = PopMark(stack, marks); SetItems(AsDict(Peek(stack)), items); break; } // SETITEMS
                    case (byte)'c': // GLOBAL
                        Push(stack, Allowed(Line(), Line()));
                        break;
                    case 0x93: // STACK_GLOBAL
                    {
                        var name = Pop(stack) as string;
                        var module = Pop(stack) as string;
                        if (name is null || module is null)
                            throw Fail("STACK_GLOBAL needs two strings");
                        Push(stack, Allowed(module, name));
                        break;
                    }
                    case (byte)'Q': Push(stack, PersistentStorage(Pop(stack))); break; // BINPERSID
                    case (byte)'R': { var arguments = Pop(stack); var callable = Pop(stack); Push(stack, Call(callable, arguments)); break; } // REDUCE
                    case 0x81: { var arguments = Pop(stack); var cls = Pop(stack); Push(stack, Call(cls, arguments)); break; } // NEWOBJ
                    case (byte)'b': // BUILD
                    {
                        var state = Pop(stack);
                        var target = Peek(stack);
                        // weights_only: an OrderedDict's state updates its attributes (such as _metadata), never its items;
                        // a tensor's state must be empty here.
                        if (target is Dict)
                            break;
                        if (target is TensorView && (state is null || state is Dict { Items.Count: 0 } || state is object[] { Length: 0 }))
                            break;
                        throw Fail($"BUILD on {TypeName(target)} with state {TypeName(state)} is not allowed");
                    }
                    case (byte)'0': Pop(stack); break; // POP
                    case (byte)'1': PopMark(stack, marks); break; // POP_MARK
                    case (byte)'2': Push(stack, Peek(stack)); break; // DUP
                    default:
                        throw Fail($"opcode 0x{opcode:x2} is not allowed in a weights-only pickle");
                }
            }
        }

        private object Allowed(string module, string name) => (module, name) switch
        {
            ("collections", "OrderedDict") or ("builtins", "dict") => new Global(module, name),
            ("torch._utils", "_rebuild_tensor_v2" or "_rebuild_tensor" or "_rebuild_parameter" or "_rebuild_parameter_with_state") => new Global(module, name),
            ("torch", "Size") => new Global(module, name),
            ("torch", _) when StorageDType(name) is not null => new Global(module, name),
            _ => throw Fail($"the pickle names {module}.{name}, which a weights-only load never calls (allowed: collections.OrderedDict, torch._utils._rebuild_tensor_v2 and its relatives, torch.Size, torch.*Storage)"),
        };

        private object? Call(object? callable, object? arguments)
        {
            if (callable is not Global global)
                throw Fail($"REDUCE calls {TypeName(callable)}, which is not callable here");
            if (arguments is not object?[] args)
                throw Fail($"REDUCE on {global.Module}.{global.Name} needs a tuple of arguments, got {TypeName(arguments)}");
            switch (global.Name)
            {
                case "OrderedDict" or "dict" when args.Length == 0:
                    return new Dict();
                case "OrderedDict" or "dict" when args.Length == 1:
                {
                    // OrderedDict(pairs), as TorchSharp.PyBridge writes it: a list or tuple of (key, value) tuples.
                    var result = new Dict();
                    IEnumerable<object?> pairs = args[0] switch
                    {
                        List<object?> list => list,
                        object?[] tuple => tuple,
                        Dict dict => dict.Items.Select(item => (object?)new[] { item.Key, item.Value }),
                        _ => throw Fail($"{global.Name}() from {TypeName(args[0])} is not read"),
                    };
                    foreach (object? pair in pairs)
                    {
                        if (pair is not object?[] { Length: 2 } kv)
                            throw Fail($"{global.Name}() needs (key, value) pairs, got {TypeName(pair)}");
                        result.Set(kv[0], kv[1], Fail);
                    }
                    return result;
                }
                case "Size" when args.Length == 1 && args[0] is object?[] sizes:
                    return sizes;
                case "_rebuild_tensor_v2" when args.Length is 6 or 7:
                case "_rebuild_tensor" when args.Length == 4:
                {
                    if (args[0] is not Storage storage)
                        throw Fail($"{global.Name} needs a storage, got {TypeName(args[0])}");
                    long offset = Integer(args[1], "storage offset");
                    long[] size = Integers(args[2], "size");
                    long[] stride = Integers(args[3], "stride");
                    if (size.Length != stride.Length)
                        throw Fail($"the tensor has {size.Length} sizes but {stride.Length} strides");
                    if (args.Length > 4 && args[5] is not (null or Dict { Items.Count: 0 }))
                        throw Fail("tensors with backward hooks are not read");
                    return new TensorView(storage, offset, size, stride);
                }
                case "_rebuild_parameter" or "_rebuild_parameter_with_state" when args.Length >= 3:
                    if (args[0] is not TensorView tensor)
                        throw Fail($"{global.Name} needs a tensor, got {TypeName(args[0])}");
                    return tensor;
                default:
                    throw Fail($"{global.Module}.{global.Name} called with {args.Length} arguments is not read");
            }
        }

        /// <summary>torch.save's persistent id: <c>('storage', torch.FloatStorage, key, location, numel)</c>.</summary>
        private Storage PersistentStorage(object? id)
        {
            if (id is not object?[] { Length: 5 } parts || parts[0] is not "storage" || parts[1] is not Global type || parts[2] is not string key)
                throw Fail($"a persistent id must be ('storage', <storage class>, key, location, numel), got {TypeName(id)}");
            ScalarType dtype = StorageDType(type.Name) ?? throw Fail($"{type.Module}.{type.Name} is not a storage class");
            long numel = Integer(parts[4], "storage size");
            if (numel < 0)
                throw Fail($"storage '{key}' has a negative size {numel}");
            if (key.Length == 0 || key.Contains('/') || key.Contains('\\') || key is "." or "..")
                throw Fail($"storage key '{key}' is not a plain name");
            return new Storage(key, dtype, numel);
        }

        internal static ScalarType? StorageDType(string name) => name switch
        {
            "FloatStorage" => ScalarType.Float32,
            "DoubleStorage" => ScalarType.Float64,
            "HalfStorage" => ScalarType.Float16,
            "BFloat16Storage" => ScalarType.BFloat16,
            "LongStorage" => ScalarType.Int64,
            "IntStorage" => ScalarType.Int32,
            "ShortStorage" => ScalarType.Int16,
            "CharStorage" => ScalarType.Int8,
            "ByteStorage" => ScalarType.Byte,
            "BoolStorage" => ScalarType.Bool,
            "ComplexFloatStorage" => ScalarType.ComplexFloat32,
            "ComplexDoubleStorage" => ScalarType.ComplexFloat64,
            _ => null,
        };

        private void SetItems(Dict dict, List<object?> items)
        {
            if (items.Count % 2 != 0)
                throw Fail("SETITEMS needs key-value pairs");
            for (int i = 0; i < items.Count; i += 2)
                dict.Set(items[i], items[i + 1], Fail);
        }

        private long Integer(object? value, string what) =>
            value is long n ? n : throw Fail($"the {what} must be an integer, got {TypeName(value)}");

        private long[] Integers(object? value, string what)
        {
            if (value is not object?[] items)
                throw Fail($"the {what} must be a tuple of integers, got {TypeName(value)}");
            var result = new long[items.Length];
            for (int i = 0; i < items.Length; i++)
                result[i] = Integer(items[i], what);
            return result;
        }

        private List<object?> AsList(object? value) => value as List<object?> ?? throw Fail($"APPEND to {TypeName(value)}");

        private Dict AsDict(object? value) => value as Dict ?? throw Fail($"SETITEM on {TypeName(value)}");

        private void Push(List<object?> stack, object? value)
        {
            if (stack.Count >= MaxStackDepth)
                throw Fail("the pickle's stack grows too deep");
            stack.Add(value);
        }

        private object? Pop(List<object?> stack)
        {
            if (stack.Count == 0)
                throw Fail("the pickle pops from an empty stack");
            object? value = stack[^1];
            stack.RemoveAt(stack.Count - 1);
            return value;
        }

        private object? Peek(List<object?> stack) => stack.Count > 0 ? stack[^1] : throw Fail("the pickle reads an empty stack");

        private List<object?> PopMark(List<object?> stack, Stack<int> marks)
        {
            if (marks.Count == 0)
                throw Fail("the pickle closes a mark it never opened");
            int mark = marks.Pop();
            if (mark > stack.Count)
                throw Fail("the pickle's mark lies above its stack");
            var items = stack.GetRange(mark, stack.Count - mark);
            stack.RemoveRange(mark, stack.Count - mark);
            return items;
        }

        private object? Recall(Dictionary<long, object?> memo, long index) =>
            memo.TryGetValue(index, out object? value) ? value : throw Fail($"the pickle recalls memo {index}, which it never stored");

        private byte Byte() => Take(1)[0];

        private ReadOnlySpan<byte> Take(int count)
        {
            if (count < 0 || count > _bytes.Length - _at)
                throw Fail($"the pickle declares {count} bytes where {_bytes.Length - _at} remain");
            var span = _bytes.AsSpan(_at, count);
            _at += count;
            return span;
        }

        private int Length(long declared) =>
            declared >= 0 && declared <= _bytes.Length - _at ? (int)declared : throw Fail($"the pickle declares {declared} bytes where {_bytes.Length - _at} remain");

        private string Line()
        {
            int end = Array.IndexOf(_bytes, (byte)'\n', _at);
            if (end < 0 || end - _at > 256)
                throw Fail("a GLOBAL name is not a short line");
            string line = Encoding.ASCII.GetString(_bytes, _at, end - _at);
            _at = end + 1;
            return line;
        }

        private long LittleEndianInteger(ReadOnlySpan<byte> bytes)
        {
            if (bytes.Length == 0)
                return 0;
            if (bytes.Length > 8)
                throw Fail($"an integer of {bytes.Length} bytes is wider than 64 bits");
            Span<byte> wide = stackalloc byte[8];
            byte fill = (bytes[^1] & 0x80) != 0 ? (byte)0xff : (byte)0;
            wide.Fill(fill);
            bytes.CopyTo(wide);
            return BinaryPrimitives.ReadInt64LittleEndian(wide);
        }

        private string Utf8(ReadOnlySpan<byte> bytes)
        {
            try
            {
                return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes);
            }
            catch (DecoderFallbackException error)
            {
                throw Fail("a string is not valid UTF-8", error);
            }
        }

        private static string Latin1(ReadOnlySpan<byte> bytes) => Encoding.Latin1.GetString(bytes);

        private CheckpointFormatException Fail(string rule) => Fail(rule, null);

        private CheckpointFormatException Fail(string rule, Exception? inner) =>
            new(_path, rule + ".", _entry, _opcodeAt, inner);
    }
}
