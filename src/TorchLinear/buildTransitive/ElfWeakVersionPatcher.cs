// TorchLinear build-time compatibility fix for TorchSharp's libLibTorchSharp.so.
//
// This one file is compiled twice: by MSBuild as the source of the inline task declared in
// TorchLinear.targets (RoslynCodeTaskFactory, Type="Class"), and by the unit tests as ordinary
// source with TORCHLINEAR_ELF_TESTS defined, so that the tests exercise exactly the code the build runs.
// It therefore uses only the BCL and reads every ELF field by hand.
//
// Why: TorchSharp 0.107.0 ships libLibTorchSharp.so built against a libstdc++ that provides
// GLIBCXX_3.4.32. Debian 12 and Ubuntu 22.04 stop at GLIBCXX_3.4.30, so the dynamic linker refuses
// the library and every torch call fails with DllNotFoundException. The only symbol bound to that
// version is std::ios_base_library_init(), a marker symbol that no relocation uses. Flagging that one
// version requirement VER_FLG_WEAK in .gnu.version_r tells the dynamic linker that a missing version
// is not fatal; where libstdc++ does provide it, the requirement is satisfied exactly as before.

using System;
using System.Collections.Generic;
using System.IO;
using System.Text;

namespace TorchLinear.Build
{
    /// <summary>What <see cref="ElfWeakVersionPatcher"/> decided about one file.</summary>
    public enum ElfPatchOutcome
    {
        /// <summary>The version requirement was flagged weak and the file rewritten.</summary>
        Patched,
        /// <summary>The requirement is already weak; the file was left untouched.</summary>
        AlreadyWeak,
        /// <summary>The file has no such version requirement; nothing to do.</summary>
        NotNeeded,
        /// <summary>A precondition failed; the file was left untouched.</summary>
        Refused,
    }

    /// <summary>The outcome of one analysis or patch, with a sentence saying why.</summary>
    public sealed class ElfPatchResult
    {
        /// <summary>Creates a result.</summary>
        public ElfPatchResult(ElfPatchOutcome outcome, string message)
        {
            Outcome = outcome;
            Message = message;
        }

        /// <summary>What was decided.</summary>
        public ElfPatchOutcome Outcome { get; }

        /// <summary>Why, in one sentence a build log can show.</summary>
        public string Message { get; }

        /// <inheritdoc />
        public override string ToString() => Outcome + ": " + Message;
    }

    /// <summary>
    /// Marks one version requirement (by default libstdc++'s <c>GLIBCXX_3.4.32</c>) weak in an ELF64
    /// little-endian shared library, but only when the single symbol bound to it is the expected one
    /// and no dynamic relocation refers to it.
    /// </summary>
    public static class ElfWeakVersionPatcher
    {
        /// <summary>The version requirement the fix makes weak.</summary>
        public const string DefaultVersion = "GLIBCXX_3.4.32";

        /// <summary>The only symbol allowed to be bound to that version (<c>std::ios_base_library_init()</c>).</summary>
        public const string DefaultSymbol = "_ZSt21ios_base_library_initv";

        private const uint ShtRela = 4;
        private const uint ShtRel = 9;
        private const uint ShtDynsym = 11;
        private const uint ShtGnuVerneed = 0x6ffffffe;
        private const uint ShtGnuVersym = 0x6fffffff;
        private const ushort VerFlgWeak = 0x2;

        /// <summary>
        /// Decides what to do with an ELF image and, when the answer is <see cref="ElfPatchOutcome.Patched"/>,
        /// sets the weak flag in <paramref name="image"/> (in memory only).
        /// </summary>
        public static ElfPatchResult Apply(byte[] image, string version = DefaultVersion, string symbol = DefaultSymbol)
        {
            try
            {
                return ApplyCore(image, version, symbol);
            }
            catch (FormatException e)
            {
                return new ElfPatchResult(ElfPatchOutcome.Refused, e.Message);
            }
        }

        /// <summary>
        /// Applies the fix to a file. The file is rewritten (through a temporary file and a rename, so a
        /// hard link to the NuGet cache is never written through) only when the outcome is
        /// <see cref="ElfPatchOutcome.Patched"/>; in every other case it is left byte for byte as it was.
        /// </summary>
        public static ElfPatchResult PatchFile(string path, string version = DefaultVersion, string symbol = DefaultSymbol)
        {
            byte[] image = File.ReadAllBytes(path);
            ElfPatchResult result = Apply(image, version, symbol);
            if (result.Outcome != ElfPatchOutcome.Patched)
                return result;

            string temporary = path + ".torchlinear-tmp";
            File.WriteAllBytes(temporary, image);
            // Unlink, then rename: if the output copy was a hard link into the NuGet cache, only the
            // link goes away and the cache keeps its original bytes.
            File.Delete(path);
            File.Move(temporary, path);
            return result;
        }

        private static ElfPatchResult ApplyCore(byte[] image, string version, string symbol)
        {
            if (image.Length < 64 || image[0] != 0x7f || image[1] != (byte)'E' || image[2] != (byte)'L' || image[3] != (byte)'F')
                return Refuse("not an ELF file (no \\x7fELF magic)");
            if (image[4] != 2)
                return Refuse("not ELF64 (EI_CLASS is " + image[4] + ", expected 2)");
            if (image[5] != 1)
                return Refuse("not little-endian (EI_DATA is " + image[5] + ", expected 1)");

            ulong shoff = U64(image, 0x28);
            int shentsize = U16(image, 0x3a);
            int shnum = U16(image, 0x3c);
            if (shentsize < 64 || shnum == 0)
                return Refuse("no usable section header table");

            var sections = new Section[shnum];
            for (int i = 0; i < shnum; i++)
            {
                long at = Checked(image, shoff + (ulong)(i * shentsize), 64);
                sections[i] = new Section(
                    type: U32(image, at + 4),
                    offset: U64(image, at + 0x18),
                    size: U64(image, at + 0x20),
                    link: U32(image, at + 0x28),
                    entsize: U64(image, at + 0x38));
            }

            int verneedIndex = Array.FindIndex(sections, s => s.Type == ShtGnuVerneed);
            if (verneedIndex < 0)
                return new ElfPatchResult(ElfPatchOutcome.NotNeeded, "no .gnu.version_r section, so no " + version + " requirement");
            Section verneed = sections[verneedIndex];
            Section verneedStrings = SectionAt(sections, verneed.Link);

            // Walk Elf64_Verneed { vn_version, vn_cnt, vn_file, vn_aux, vn_next } and its
            // Elf64_Vernaux { vna_hash, vna_flags, vna_other, vna_name, vna_next } chains.
            long flagsAt = -1;
            ushort versionIndex = 0;
            ushort flags = 0;
            long need = Checked(image, verneed.Offset, 16);
            long verneedEnd = (long)(verneed.Offset + verneed.Size);
            for (int guard = 0; guard < 4096; guard++)
            {
                int count = U16(image, need + 2);
                long aux = need + U32(image, need + 8);
                for (int j = 0; j < count; j++)
                {
                    Checked(image, (ulong)aux, 16);
                    if (aux + 16 > verneedEnd)
                        throw new FormatException(".gnu.version_r entry runs past its section");
                    string name = CString(image, verneedStrings, U32(image, aux + 8));
                    if (name == version)
                    {
                        flagsAt = aux + 4;
                        flags = (ushort)U16(image, aux + 4);
                        versionIndex = (ushort)(U16(image, aux + 6) & 0x7fff);
                    }
                    uint nextAux = U32(image, aux + 12);
                    if (nextAux == 0)
                        break;
                    aux += nextAux;
                }
                uint next = U32(image, need + 12);
                if (next == 0)
                    break;
                need += next;
                Checked(image, (ulong)need, 16);
            }

            if (flagsAt < 0)
                return new ElfPatchResult(ElfPatchOutcome.NotNeeded, "the library does not require " + version);

            int dynsymIndex = Array.FindIndex(sections, s => s.Type == ShtDynsym);
            int versymIndex = Array.FindIndex(sections, s => s.Type == ShtGnuVersym);
            if (dynsymIndex < 0 || versymIndex < 0)
                return Refuse("no .dynsym or .gnu.version section, so the symbols bound to " + version + " cannot be checked");
            Section dynsym = sections[dynsymIndex];
            Section versym = sections[versymIndex];
            Section dynstr = SectionAt(sections, dynsym.Link);
            ulong symbolSize = dynsym.EntrySize == 0 ? 24 : dynsym.EntrySize;
            long symbolCount = (long)(dynsym.Size / symbolSize);
            if ((long)(versym.Size / 2) != symbolCount)
                return Refuse(".gnu.version has " + versym.Size / 2 + " entries for " + symbolCount + " dynamic symbols");

            var bound = new HashSet<long>();
            for (long s = 0; s < symbolCount; s++)
            {
                long versymAt = Checked(image, versym.Offset + (ulong)(2 * s), 2);
                if ((U16(image, versymAt) & 0x7fff) != versionIndex)
                    continue;
                long symbolAt = Checked(image, dynsym.Offset + (ulong)s * symbolSize, 24);
                string name = CString(image, dynstr, U32(image, symbolAt));
                if (name != symbol)
                    return Refuse("symbol '" + name + "' is also bound to " + version + "; only '" + symbol + "' may be");
                bound.Add(s);
            }

            for (int i = 0; i < sections.Length; i++)
            {
                Section relocations = sections[i];
                if ((relocations.Type != ShtRela && relocations.Type != ShtRel) || relocations.Link != (uint)dynsymIndex)
                    continue;
                ulong entrySize = relocations.EntrySize != 0 ? relocations.EntrySize : (relocations.Type == ShtRela ? 24UL : 16UL);
                long entries = (long)(relocations.Size / entrySize);
                for (long r = 0; r < entries; r++)
                {
                    long at = Checked(image, relocations.Offset + (ulong)r * entrySize, 16);
                    long symbolIndex = (long)(U64(image, at + 8) >> 32);
                    if (bound.Contains(symbolIndex))
                        return Refuse("a dynamic relocation refers to '" + symbol + "', so the symbol is really used and the " + version + " requirement cannot be weakened");
                }
            }

            if ((flags & VerFlgWeak) != 0)
                return new ElfPatchResult(ElfPatchOutcome.AlreadyWeak, "the " + version + " requirement is already weak");

            ushort patched = (ushort)(flags | VerFlgWeak);
            image[flagsAt] = (byte)patched;
            image[flagsAt + 1] = (byte)(patched >> 8);
            return new ElfPatchResult(
                ElfPatchOutcome.Patched,
                "marked the " + version + " requirement weak (bound only to '" + symbol + "', which no relocation uses)");
        }

        private static ElfPatchResult Refuse(string why) => new ElfPatchResult(ElfPatchOutcome.Refused, why);

        private static Section SectionAt(Section[] sections, uint index)
        {
            if (index >= sections.Length)
                throw new FormatException("section link " + index + " is out of range");
            return sections[index];
        }

        private static long Checked(byte[] image, ulong offset, int length)
        {
            if (offset > (ulong)image.Length || (ulong)image.Length - offset < (ulong)length)
                throw new FormatException("offset " + offset + " lies outside the " + image.Length + "-byte file");
            return (long)offset;
        }

        private static string CString(byte[] image, Section strings, uint offset)
        {
            long start = Checked(image, strings.Offset + offset, 1);
            long end = start;
            while (end < image.Length && image[end] != 0)
                end++;
            return Encoding.ASCII.GetString(image, (int)start, (int)(end - start));
        }

        private static int U16(byte[] b, long at) => b[at] | (b[at + 1] << 8);

        private static uint U32(byte[] b, long at) => (uint)(b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24));

        private static ulong U64(byte[] b, long at) => U32(b, at) | ((ulong)U32(b, at + 4) << 32);

        private readonly struct Section
        {
            public Section(uint type, ulong offset, ulong size, uint link, ulong entsize)
            {
                Type = type;
                Offset = offset;
                Size = size;
                Link = link;
                EntrySize = entsize;
            }

            public uint Type { get; }
            public ulong Offset { get; }
            public ulong Size { get; }
            public uint Link { get; }
            public ulong EntrySize { get; }
        }
    }

#if !TORCHLINEAR_ELF_TESTS
    /// <summary>The MSBuild task: applies <see cref="ElfWeakVersionPatcher"/> to each given file.</summary>
    public sealed class TorchLinearWeakenGlibcxxRequirement : Microsoft.Build.Utilities.Task
    {
        /// <summary>The output copies of libLibTorchSharp.so to fix.</summary>
        [Microsoft.Build.Framework.Required]
        public Microsoft.Build.Framework.ITaskItem[] Files { get; set; } = Array.Empty<Microsoft.Build.Framework.ITaskItem>();

        /// <inheritdoc />
        public override bool Execute()
        {
            foreach (Microsoft.Build.Framework.ITaskItem item in Files)
            {
                string path = item.GetMetadata("FullPath");
                ElfPatchResult result = ElfWeakVersionPatcher.PatchFile(path);
                switch (result.Outcome)
                {
                    case ElfPatchOutcome.Patched:
                        Log.LogMessage(Microsoft.Build.Framework.MessageImportance.High,
                            "TorchLinear: " + path + ": " + result.Message + ", so it loads with libstdc++ older than GCC 13 (opt out: TorchLinearPatchLibTorchSharp=false).");
                        break;
                    case ElfPatchOutcome.Refused:
                        Log.LogWarning(null, "TORCHLINEAR001", null, path, 0, 0, 0, 0,
                            "TorchLinear left " + path + " untouched: " + result.Message + ". On systems whose libstdc++ lacks GLIBCXX_3.4.32 TorchSharp may fail to load.");
                        break;
                    default:
                        Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Low, "TorchLinear: " + path + ": " + result.Message + "; nothing to do.");
                        break;
                }
            }
            return !Log.HasLoggedErrors;
        }
    }
#endif
}
