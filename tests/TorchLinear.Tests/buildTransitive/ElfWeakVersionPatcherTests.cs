using System;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Text;
using TorchLinear.Build;
using Xunit;

namespace TorchLinear.Tests.Build
{
    /// <summary>
    /// Tests of the build's ELF fix, compiled from the very source file the build's inline task uses.
    /// The checks here read the ELF structures with their own small reader, so they do not trust the patcher's.
    /// </summary>
    public sealed class ElfWeakVersionPatcherTests : IDisposable
    {
        private const ushort VerFlgWeak = 0x2;
        private readonly string _folder = Directory.CreateTempSubdirectory("torchlinear-elf-").FullName;

        public void Dispose() => Directory.Delete(_folder, recursive: true);

        /// <summary>The untouched library in the NuGet cache (the build only ever rewrites output copies).</summary>
        private static string OriginalLibrary()
        {
            string package = typeof(ElfWeakVersionPatcherTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
                .Single(a => a.Key == "TorchSharpPackageFolder").Value!;
            string path = Path.Combine(package, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
            Assert.True(File.Exists(path), $"TorchSharp's libLibTorchSharp.so should be at {path}");
            return path;
        }

        private string CopyOfOriginal()
        {
            string copy = Path.Combine(_folder, "libLibTorchSharp.so");
            File.Copy(OriginalLibrary(), copy, overwrite: true);
            return copy;
        }

        [Fact]
        public void RealLibrary_GetsExactlyTheWeakFlagOnItsGlibcxx3432Need()
        {
            string copy = CopyOfOriginal();
            byte[] before = File.ReadAllBytes(copy);

            var result = ElfWeakVersionPatcher.PatchFile(copy);

            Assert.Equal(ElfPatchOutcome.Patched, result.Outcome);
            byte[] after = File.ReadAllBytes(copy);
            Assert.Equal(before.Length, after.Length);
            int[] changed = Enumerable.Range(0, before.Length).Where(i => before[i] != after[i]).ToArray();
            int at = Assert.Single(changed);
            Assert.Equal(before[at] | VerFlgWeak, after[at]);

            // The changed byte is the low byte of vna_flags in the Vernaux entry naming GLIBCXX_3.4.32.
            var elf = new ElfReader(after);
            var verneed = elf.Sections.Single(s => s.Type == 0x6ffffffe);
            Assert.InRange(at, (long)verneed.Offset, (long)(verneed.Offset + verneed.Size) - 1);
            long aux = at - 4;
            Assert.Equal("GLIBCXX_3.4.32", elf.String(elf.Sections[(int)verneed.Link], elf.U32(aux + 8)));
        }

        [Fact]
        public void SecondRun_ChangesNothing()
        {
            string copy = CopyOfOriginal();
            Assert.Equal(ElfPatchOutcome.Patched, ElfWeakVersionPatcher.PatchFile(copy).Outcome);
            byte[] once = File.ReadAllBytes(copy);
            DateTime written = File.GetLastWriteTimeUtc(copy);

            var second = ElfWeakVersionPatcher.PatchFile(copy);

            Assert.Equal(ElfPatchOutcome.AlreadyWeak, second.Outcome);
            Assert.Equal(once, File.ReadAllBytes(copy));
            Assert.Equal(written, File.GetLastWriteTimeUtc(copy));
        }

        [Fact]
        public void AnotherSymbolBoundToTheVersion_IsRefusedAndTheFileUntouched()
        {
            byte[] image = File.ReadAllBytes(OriginalLibrary());
            var elf = new ElfReader(image);
            var (versym, dynsym, dynstr) = elf.SymbolTables();
            ushort glibcxx3432 = VersionIndexOf(image, "_ZSt21ios_base_library_initv");
            // Rebind some other versioned symbol (any index above the special 0 and 1) to GLIBCXX_3.4.32.
            long other = Enumerable.Range(1, (int)(dynsym.Size / 24)).First(i =>
            {
                int v = elf.U16((long)versym.Offset + 2 * i) & 0x7fff;
                return v > 1 && v != glibcxx3432;
            });
            string otherName = elf.String(dynstr, elf.U32((long)dynsym.Offset + other * 24));
            image[(long)versym.Offset + 2 * other] = (byte)glibcxx3432;
            image[(long)versym.Offset + 2 * other + 1] = (byte)(glibcxx3432 >> 8);

            var result = AssertRefusedUntouched(image);

            Assert.Contains($"symbol '{otherName}' is also bound to GLIBCXX_3.4.32", result.Message);
        }

        [Fact]
        public void RelocationReferringToTheSymbol_IsRefusedAndTheFileUntouched()
        {
            byte[] image = File.ReadAllBytes(OriginalLibrary());
            var elf = new ElfReader(image);
            long symbol = SymbolIndexOf(elf, "_ZSt21ios_base_library_initv");
            var relaPlt = elf.Sections.First(s => s.Type == 4 && s.Size > 0);
            // Point the first relocation's r_info symbol (upper 32 bits) at the marker symbol.
            long info = (long)relaPlt.Offset + 8 + 4;
            BitConverter.GetBytes((uint)symbol).CopyTo(image, info);

            var result = AssertRefusedUntouched(image);

            Assert.Contains("a dynamic relocation refers to '_ZSt21ios_base_library_initv'", result.Message);
        }

        [Theory]
        [InlineData(4, 1, "not ELF64")]
        [InlineData(5, 2, "not little-endian")]
        public void OtherElfFlavours_AreRefused(int offset, byte value, string reason)
        {
            byte[] image = File.ReadAllBytes(OriginalLibrary());
            image[offset] = value;
            Assert.Contains(reason, AssertRefusedUntouched(image).Message);
        }

        [Fact]
        public void NonElfFile_IsRefusedAndUntouched()
        {
            byte[] text = Encoding.ASCII.GetBytes("#!/bin/sh\necho this is not a shared library\n" + new string('x', 100));
            Assert.Contains("not an ELF file", AssertRefusedUntouched(text).Message);
        }

        [Fact]
        public void TruncatedLibrary_IsRefusedNotCrashed()
        {
            byte[] image = File.ReadAllBytes(OriginalLibrary());
            Assert.Contains("outside the 4096-byte file", AssertRefusedUntouched(image[..4096]).Message);
        }

        [Fact]
        public void LibraryWithoutTheNeed_IsLeftAlone()
        {
            byte[] image = File.ReadAllBytes(OriginalLibrary());
            // Rename the needed version in .dynstr: the library then no longer asks for GLIBCXX_3.4.32.
            int at = IndexOf(image, Encoding.ASCII.GetBytes("GLIBCXX_3.4.32\0"));
            image[at + 13] = (byte)'9';
            string path = Path.Combine(_folder, "renamed.so");
            File.WriteAllBytes(path, image);

            var result = ElfWeakVersionPatcher.PatchFile(path);

            Assert.Equal(ElfPatchOutcome.NotNeeded, result.Outcome);
            Assert.Equal(image, File.ReadAllBytes(path));
        }

        [Fact]
        public void Build_PatchedTheOutputCopy_NotTheNuGetCache()
        {
            // This test process loaded TorchSharp from the output folder; the build must have weakened that copy,
            // while the file in the NuGet cache still has the strict requirement.
            string output = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
            Assert.Equal(ElfPatchOutcome.AlreadyWeak, ElfWeakVersionPatcher.Apply(File.ReadAllBytes(output)).Outcome);
            Assert.Equal(ElfPatchOutcome.Patched, ElfWeakVersionPatcher.Apply(File.ReadAllBytes(OriginalLibrary())).Outcome);
        }

        private ElfPatchResult AssertRefusedUntouched(byte[] image)
        {
            string path = Path.Combine(_folder, "crafted.so");
            File.WriteAllBytes(path, image);
            var result = ElfWeakVersionPatcher.PatchFile(path);
            Assert.Equal(ElfPatchOutcome.Refused, result.Outcome);
            Assert.Equal(image, File.ReadAllBytes(path));
            return result;
        }

        private static ushort VersionIndexOf(byte[] image, string symbolName)
        {
            var elf = new ElfReader(image);
            var (versym, _, _) = elf.SymbolTables();
            return (ushort)(elf.U16((long)versym.Offset + 2 * SymbolIndexOf(elf, symbolName)) & 0x7fff);
        }

        private static long SymbolIndexOf(ElfReader elf, string name)
        {
            var (_, dynsym, dynstr) = elf.SymbolTables();
            for (long i = 0; i < (long)(dynsym.Size / 24); i++)
            {
                if (elf.String(dynstr, elf.U32((long)dynsym.Offset + i * 24)) == name)
                    return i;
            }
            throw new InvalidOperationException($"{name} is not a dynamic symbol");
        }

        private static int IndexOf(byte[] haystack, byte[] needle)
        {
            for (int i = 0; i <= haystack.Length - needle.Length; i++)
            {
                if (haystack.AsSpan(i, needle.Length).SequenceEqual(needle))
                    return i;
            }
            throw new InvalidOperationException("pattern not found");
        }

        /// <summary>Just enough of an ELF64 little-endian reader to find and craft what the tests need.</summary>
        private sealed class ElfReader
        {
            private readonly byte[] _image;

            public ElfReader(byte[] image)
            {
                _image = image;
                long shoff = (long)BitConverter.ToUInt64(image, 0x28);
                int entsize = BitConverter.ToUInt16(image, 0x3a);
                int count = BitConverter.ToUInt16(image, 0x3c);
                Sections = Enumerable.Range(0, count).Select(i =>
                {
                    long at = shoff + i * entsize;
                    return new Section(
                        BitConverter.ToUInt32(image, (int)at + 4),
                        BitConverter.ToUInt64(image, (int)at + 0x18),
                        BitConverter.ToUInt64(image, (int)at + 0x20),
                        BitConverter.ToUInt32(image, (int)at + 0x28));
                }).ToArray();
            }

            public Section[] Sections { get; }

            public (Section versym, Section dynsym, Section dynstr) SymbolTables()
            {
                var dynsym = Sections.Single(s => s.Type == 11);
                return (Sections.Single(s => s.Type == 0x6fffffff), dynsym, Sections[(int)dynsym.Link]);
            }

            public int U16(long at) => BitConverter.ToUInt16(_image, (int)at);

            public uint U32(long at) => BitConverter.ToUInt32(_image, (int)at);

            public string String(Section table, uint offset)
            {
                int start = (int)(table.Offset + offset);
                int end = Array.IndexOf(_image, (byte)0, start);
                return Encoding.ASCII.GetString(_image, start, end - start);
            }
        }

        private sealed record Section(uint Type, ulong Offset, ulong Size, uint Link);
    }
}
