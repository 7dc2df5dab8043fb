using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Text.RegularExpressions;
using System.Xml.Linq;
using TorchLinear.Tests;
using Xunit;
using Xunit.Abstractions;

namespace TorchLinear.IntegrationTests.Docs
{
    /// <summary>
    /// Every C# block of the README is a program: it is built as an application that references TorchLinear and
    /// TorchSharp-cpu, run, and what it prints is checked against its <c>// prints:</c> comments.
    /// </summary>
    public class ReadmeTests
    {
        private static readonly Regex CSharpBlock = new(@"^```csharp\n(.*?)^```", RegexOptions.Multiline | RegexOptions.Singleline);
        private static readonly Regex Prints = new(@"// prints: (.*)$", RegexOptions.Multiline);
        private static readonly Regex RepositoryFile = new(@"""((?:samples|tests)/[A-Za-z0-9_./-]+\.[a-z]+)""");

        private readonly ITestOutputHelper _output;

        public ReadmeTests(ITestOutputHelper output) => _output = output;

        public static IEnumerable<object[]> Blocks() =>
            CSharpBlocks().Select((block, index) => new object[] { index });

        private static List<string> CSharpBlocks() =>
            CSharpBlock.Matches(File.ReadAllText(Path.Combine(Snapshots.RepositoryRoot, "README.md")).Replace("\r\n", "\n"))
                .Select(m => m.Groups[1].Value).ToList();

        [Fact]
        public void Readme_HasCSharpBlocks_ThatSayWhatTheyPrint()
        {
            var blocks = CSharpBlocks();
            Assert.NotEmpty(blocks);
            Assert.All(blocks, block => Assert.Matches(Prints, block));
        }

        [Theory]
        [MemberData(nameof(Blocks))]
        public void ReadmeBlock_Compiles_Runs_AndPrintsWhatItSays(int index)
        {
            string code = CSharpBlocks()[index];
            string folder = Directory.CreateTempSubdirectory("torchlinear-readme-").FullName;
            try
            {
                File.WriteAllText(Path.Combine(folder, "Program.cs"), code);
                // A block that names a file of the repository ("samples/...") runs where that path leads to it, as it
                // does from the repository's root.
                foreach (Match file in RepositoryFile.Matches(code))
                {
                    string relative = file.Groups[1].Value;
                    string target = Path.Combine(folder, relative);
                    Directory.CreateDirectory(Path.GetDirectoryName(target)!);
                    File.Copy(Path.Combine(Snapshots.RepositoryRoot, relative), target);
                }
                File.WriteAllText(Path.Combine(folder, "ReadmeBlock.csproj"), Project());
                Run(folder, "build", "-o", "out", "--nologo", "-v", "q");
                string printed = Run(folder, Path.Combine(folder, "out", "ReadmeBlock.dll"));
                _output.WriteLine(printed);

                // Each "// prints: X" must be matched, in order, by a line that equals X (or starts with X without a
                // trailing "...").
                var lines = printed.Replace("\r\n", "\n").Split('\n');
                int next = 0;
                foreach (Match expected in Prints.Matches(code))
                {
                    string text = expected.Groups[1].Value.TrimEnd();
                    bool prefix = text.EndsWith("...", StringComparison.Ordinal);
                    if (prefix)
                        text = text[..^3];
                    int found = Array.FindIndex(lines, next, line => prefix ? line.StartsWith(text, StringComparison.Ordinal) : line == text);
                    Assert.True(found >= 0, $"README block {index} should print{Environment.NewLine}  {text}{Environment.NewLine}after line {next}, but printed:{Environment.NewLine}{printed}");
                    next = found + 1;
                }
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        /// <summary>
        /// An application as a user writes it: TorchLinear and TorchLinear.Lora (the assemblies these tests were built
        /// with, standing in for the packages, plus the build fix as buildTransitive brings it), and the CPU backend and
        /// PyBridge at the repository's versions.
        /// </summary>
        private static string Project()
        {
            var versions = XDocument.Load(Path.Combine(Snapshots.RepositoryRoot, "Directory.Packages.props"))
                .Descendants("PackageVersion").ToDictionary(e => (string)e.Attribute("Include")!, e => (string)e.Attribute("Version")!);
            string library = Path.Combine(AppContext.BaseDirectory, "TorchLinear.dll");
            string lora = Path.Combine(AppContext.BaseDirectory, "TorchLinear.Lora.dll");
            string targets = Path.Combine(Snapshots.RepositoryRoot, "src", "TorchLinear", "buildTransitive", "TorchLinear.targets");
            return $"""
                <Project Sdk="Microsoft.NET.Sdk">
                  <PropertyGroup>
                    <OutputType>Exe</OutputType>
                    <TargetFramework>net10.0</TargetFramework>
                    <Nullable>enable</Nullable>
                    <TreatWarningsAsErrors>true</TreatWarningsAsErrors>
                    <!-- Not a user's choice, but saves copying libtorch (1.2 GB) once per block. -->
                    <CreateHardLinksForCopyLocalIfPossible>true</CreateHardLinksForCopyLocalIfPossible>
                  </PropertyGroup>
                  <ItemGroup>
                    <PackageReference Include="TorchSharp-cpu" Version="{versions["TorchSharp-cpu"]}" />
                    <PackageReference Include="TorchSharp.PyBridge" Version="{versions["TorchSharp.PyBridge"]}" />
                    <Reference Include="TorchLinear" HintPath="{library}" />
                    <Reference Include="TorchLinear.Lora" HintPath="{lora}" />
                  </ItemGroup>
                  <Import Project="{targets}" />
                </Project>
                """;
        }

        private static string Run(string folder, params string[] arguments)
        {
            var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                WorkingDirectory = folder,
            };
            foreach (string argument in arguments)
                start.ArgumentList.Add(argument);
            // The test host's MSBuild settings must not leak into the child build.
            foreach (string variable in new[] { "MSBuildSDKsPath", "MSBUILD_EXE_PATH", "MSBuildExtensionsPath" })
                start.Environment.Remove(variable);
            using var process = Process.Start(start)!;
            var stderr = process.StandardError.ReadToEndAsync();
            string stdout = process.StandardOutput.ReadToEnd();
            Assert.True(process.WaitForExit(300_000), $"dotnet {string.Join(' ', arguments)} did not finish within 5 minutes");
            Assert.True(process.ExitCode == 0, $"dotnet {string.Join(' ', arguments)} exited with {process.ExitCode}:{Environment.NewLine}{stdout}{stderr.Result}");
            return stdout;
        }
    }
}
