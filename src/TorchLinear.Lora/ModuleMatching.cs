using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using System.Text.RegularExpressions;

namespace TorchLinear.Lora
{
    /// <summary>
    /// PEFT's rules for which modules a <see cref="LoraConfig"/> names, written once and used everywhere (targeting,
    /// freezing, saving, disabling, unloading): <c>check_target_module_exists</c> and <c>get_pattern_key</c> of PEFT's
    /// <c>tuners_utils.py</c>, and the <c>modules_to_save</c> rule of its <c>ModulesToSaveWrapper</c>.
    /// </summary>
    /// <remarks>
    /// <para>A list entry is a <b>name</b>: it matches a module whose path equals it or ends with <c>"." + entry</c>
    /// (<c>q_proj</c> and <c>self_attn.q_proj</c> both match <c>model.layers.0.self_attn.q_proj</c>). Names are never
    /// put into a regular expression, so no entry can be slow to match, and a list of any length is decided in time
    /// linear in its size.</para>
    /// <para>A <b>string</b> is a regular expression, as in PEFT: <c>target_modules</c> and <c>exclude_modules</c> must match
    /// the whole path (Python's <c>re.fullmatch</c>), a <c>rank_pattern</c> or <c>alpha_pattern</c> key must match the end
    /// of the path from a dot or its start (PEFT's <c>(.*\.)?(key)$</c>). Python's named groups <c>(?P&lt;n&gt;...)</c>,
    /// <c>(?P=n)</c> and <c>\Z</c> are translated. Every expression runs on .NET's non-backtracking engine, whose time
    /// is linear in the path's length, or, for the constructs that engine lacks (backreferences, lookarounds), with a
    /// match timeout of <see cref="MatchTimeout"/>: a pattern that runs past it is refused, naming its key.</para>
    /// <para><c>modules_to_save</c> differs from PEFT in one respect, on purpose: PEFT's <c>ModulesToSaveWrapper</c> takes
    /// every module whose path ends with the entry as a string (<c>classifier</c> also takes <c>my_classifier</c>), while
    /// its targeting rule reads the entry at dots; here both read it at dots.</para>
    /// </remarks>
    public static class ModuleMatching
    {
        /// <summary>How long one match of a backtracking pattern may run before it is refused.</summary>
        public static readonly TimeSpan MatchTimeout = TimeSpan.FromMilliseconds(250);

        /// <summary>
        /// PEFT's <c>check_target_module_exists</c>: whether the module at <paramref name="key"/> is named by
        /// <c>target_modules</c> and not by <c>exclude_modules</c>, and lies in no <c>modules_to_save</c> module. (Whether
        /// it is a layer an adapter fits, and <c>"all-linear"</c>, are decided where the module is known.)
        /// </summary>
        /// <exception cref="ArgumentException">A regular expression of the config is invalid or ran past its bound; the
        /// message names the config's key.</exception>
        public static bool check_target_module_exists(LoraConfig config, string key)
        {
            ArgumentNullException.ThrowIfNull(config);
            ArgumentNullException.ThrowIfNull(key);
            if (IsExcluded(config, key) || IsInModuleToSave(config, key))
                return false;
            if (config.TargetModulesRegex is { } regex)
                return IsAllLinear(regex) || config.Patterns.FullMatch("target_modules", regex, key);
            return config.target_modules is { } names && config.Patterns.NameMatches("target_modules", names, key);
        }

        /// <summary>Whether <paramref name="key"/> is matched by <c>exclude_modules</c> (a list of names, or a full-match regex).</summary>
        public static bool IsExcluded(LoraConfig config, string key)
        {
            ArgumentNullException.ThrowIfNull(config);
            ArgumentNullException.ThrowIfNull(key);
            if (config.ExcludeModulesRegex is { } regex)
                return config.Patterns.FullMatch("exclude_modules", regex, key);
            return config.exclude_modules is { } names && config.Patterns.NameMatches("exclude_modules", names, key);
        }

        /// <summary>
        /// Whether the module at <paramref name="key"/> is a <c>modules_to_save</c> module: its path equals an entry or
        /// ends with <c>"." + entry</c>, at any depth (<c>classifier</c> takes <c>head.classifier</c>). A module inside
        /// another saved module is saved as part of that one, not on its own (see <see cref="IsInModuleToSave"/>).
        /// </summary>
        public static bool IsModuleToSave(LoraConfig config, string key) => ModuleToSave(config, key);

        /// <summary>The old name of <see cref="IsModuleToSave"/>, which it calls.</summary>
        [Obsolete("use ModuleMatching.IsModuleToSave")]
        public static bool is_module_to_save(LoraConfig config, string key) => IsModuleToSave(config, key);

        /// <summary>The old name of <see cref="IsInModuleToSave"/>, which it calls.</summary>
        [Obsolete("use ModuleMatching.IsInModuleToSave")]
        public static bool is_in_module_to_save(LoraConfig config, string key) => IsInModuleToSave(config, key);

        private static bool ModuleToSave(LoraConfig config, string key)
        {
            ArgumentNullException.ThrowIfNull(config);
            ArgumentNullException.ThrowIfNull(key);
            return config.modules_to_save is { Count: > 0 } names && config.Patterns.NameMatches("modules_to_save", names, key);
        }

        /// <summary>
        /// Whether <paramref name="key"/> is a <c>modules_to_save</c> module or lies inside one (PEFT's targeting rule
        /// <c>(^|.*\.)entry($|\..*)</c>, read as names): such a module never gets an adapter.
        /// </summary>
        public static bool IsInModuleToSave(LoraConfig config, string key)
        {
            ArgumentNullException.ThrowIfNull(config);
            ArgumentNullException.ThrowIfNull(key);
            if (config.modules_to_save is not { Count: > 0 })
                return false;
            // The module itself or any of its ancestors: every prefix of the path that ends at a dot.
            for (int end = key.IndexOf('.'); end >= 0; end = key.IndexOf('.', end + 1))
            {
                if (IsModuleToSave(config, key[..end]))
                    return true;
            }
            return IsModuleToSave(config, key);
        }

        /// <summary>
        /// PEFT's <c>get_pattern_key</c>: the first key of <paramref name="patternKeys"/>, in order, that matches the end of
        /// <paramref name="key"/> from a dot or its start, as the regular expression <c>(.*\.)?(patternKey)$</c>; null when
        /// none does (PEFT then uses <c>r</c> / <c>lora_alpha</c>).
        /// </summary>
        /// <param name="config">The config the keys belong to (its compiled expressions are kept there).</param>
        /// <param name="field">The field the keys come from (<c>rank_pattern</c> or <c>alpha_pattern</c>), for messages.</param>
        /// <param name="patternKeys">The pattern's keys, in the file's order.</param>
        /// <param name="key">The module's path.</param>
        public static string? get_pattern_key(LoraConfig config, string field, IEnumerable<string> patternKeys, string key)
        {
            ArgumentNullException.ThrowIfNull(config);
            ArgumentNullException.ThrowIfNull(patternKeys);
            ArgumentNullException.ThrowIfNull(key);
            foreach (string pattern in patternKeys)
            {
                if (config.Patterns.EndMatch($"{field}.{pattern}", pattern, key))
                    return pattern;
            }
            return null;
        }

        internal static bool IsAllLinear(string target) => string.Equals(target, "all-linear", StringComparison.OrdinalIgnoreCase);

        /// <summary>Every dotted suffix of a path, the path itself first: <c>a.b.c</c>, <c>b.c</c>, <c>c</c>.</summary>
        internal static IEnumerable<string> DottedSuffixes(string key)
        {
            yield return key;
            for (int dot = key.IndexOf('.'); dot >= 0; dot = key.IndexOf('.', dot + 1))
                yield return key[(dot + 1)..];
        }
    }

    /// <summary>
    /// A config's names as sets and its regular expressions compiled once, with their bounds. Kept by the config, and
    /// rebuilt when a field it was built from changes.
    /// </summary>
    internal sealed class ConfigPatterns
    {
        private readonly Dictionary<(string Kind, string Pattern), Regex> _regexes = new();
        private readonly Dictionary<string, (IReadOnlyList<string> Source, HashSet<string> Set)> _names = new();
        private readonly object _lock = new();

        internal bool NameMatches(string field, IReadOnlyList<string> names, string key)
        {
            HashSet<string> set;
            lock (_lock)
            {
                if (!_names.TryGetValue(field, out var cached) || !ReferenceEquals(cached.Source, names))
                {
                    cached = (names, new HashSet<string>(names, StringComparer.Ordinal));
                    _names[field] = cached;
                }
                set = cached.Set;
            }
            foreach (string suffix in ModuleMatching.DottedSuffixes(key))
            {
                if (set.Contains(suffix))
                    return true;
            }
            return false;
        }

        internal bool FullMatch(string field, string pattern, string key) =>
            Wildcards.Of(pattern) is { } wildcards ? wildcards.FullMatch(key) : Match(field, "full", pattern, key);

        internal bool EndMatch(string field, string pattern, string key) =>
            Wildcards.Of(pattern) is { } wildcards ? wildcards.EndMatch(key) : Match(field, "end", pattern, key);

        /// <summary>Compiles every expression of the config now, so that an invalid one is refused before anything is matched.</summary>
        internal void Validate(string field, string pattern, bool end)
        {
            if (Wildcards.Of(pattern) is null)
                Get(field, end ? "end" : "full", pattern);
        }

        /// <summary>Whether <paramref name="pattern"/> needs the regular-expression engine (it is more than literals and dots).</summary>
        internal static bool NeedsEngine(string pattern) => Wildcards.Of(pattern) is null;

        private bool Match(string field, string kind, string pattern, string key)
        {
            Regex regex = Get(field, kind, pattern);
            try
            {
                return regex.IsMatch(key);
            }
            catch (RegexMatchTimeoutException)
            {
                throw new PatternException(field, $"the regular expression '{Shorten(pattern)}' ran past its time bound ({ModuleMatching.MatchTimeout.TotalMilliseconds} ms) on the module path '{Shorten(key)}': refused as a runaway pattern");
            }
        }

        private Regex Get(string field, string kind, string pattern)
        {
            lock (_lock)
            {
                if (_regexes.TryGetValue((kind, pattern), out Regex? cached))
                    return cached;
            }
            string translated = FromPython(pattern);
            try
            {
                // The user's expression alone first, so that a syntax error is reported against what they wrote.
                _ = new Regex(translated, RegexOptions.CultureInvariant | RegexOptions.NonBacktracking);
            }
            catch (NotSupportedException)
            {
                // Backreferences, lookarounds and the like: the backtracking engine parses them.
            }
            catch (ArgumentException error)
            {
                throw new PatternException(field, $"'{Shorten(pattern)}' is not a valid regular expression ({error.Message})");
            }
            string anchored = kind == "full" ? $@"\A(?:{translated})\z" : $@"\A(.*\.)?({translated})$";
            Regex regex;
            try
            {
                regex = new Regex(anchored, RegexOptions.CultureInvariant | RegexOptions.NonBacktracking);
            }
            catch (NotSupportedException)
            {
                try
                {
                    regex = new Regex(anchored, RegexOptions.CultureInvariant, ModuleMatching.MatchTimeout);
                }
                catch (ArgumentException error)
                {
                    throw new PatternException(field, $"'{Shorten(pattern)}' is not a valid regular expression ({error.Message})");
                }
            }
            catch (ArgumentException error)
            {
                throw new PatternException(field, $"'{Shorten(pattern)}' is not a valid regular expression ({error.Message})");
            }
            lock (_lock)
                _regexes[(kind, pattern)] = regex;
            return regex;
        }

        /// <summary>Python's <c>(?P&lt;name&gt;</c>, <c>(?P=name)</c> and <c>\Z</c> in .NET's spelling; everything else as written.</summary>
        internal static string FromPython(string pattern)
        {
            if (!pattern.Contains("(?P", StringComparison.Ordinal) && !pattern.Contains(@"\Z", StringComparison.Ordinal))
                return pattern;
            var result = new StringBuilder(pattern.Length);
            for (int i = 0; i < pattern.Length; i++)
            {
                char c = pattern[i];
                if (c == '\\' && i + 1 < pattern.Length)
                {
                    result.Append(pattern[i + 1] == 'Z' ? @"\z" : pattern.Substring(i, 2));
                    i++;
                }
                else if (string.CompareOrdinal(pattern, i, "(?P<", 0, 4) == 0)
                {
                    result.Append("(?<");
                    i += 3;
                }
                else if (string.CompareOrdinal(pattern, i, "(?P=", 0, 4) == 0 && pattern.IndexOf(')', i) is int close and > 0)
                {
                    result.Append(@"\k<").Append(pattern, i + 4, close - i - 4).Append('>');
                    i = close;
                }
                else
                {
                    result.Append(c);
                }
            }
            return result.ToString();
        }

        internal static string Shorten(string text) => text.Length <= 120 ? text : text[..117] + "...";
    }

    /// <summary>
    /// A pattern of literal characters and dots — a module path as most configs write a key, <c>model.layers.0.q_proj</c>
    /// — matched without a regular-expression engine, with the meaning the expression has: a dot stands for any character
    /// but a newline, a backslash before any other character than a letter or a digit makes it literal (as in Python). The
    /// engine costs milliseconds and hundreds of kilobytes per expression; this, a comparison per character.
    /// </summary>
    internal sealed class Wildcards
    {
        private readonly string _text;
        private readonly bool[] _any;

        private Wildcards(string text, bool[] any)
        {
            _text = text;
            _any = any;
        }

        internal static Wildcards? Of(string pattern)
        {
            var text = new StringBuilder(pattern.Length);
            var any = new List<bool>(pattern.Length);
            for (int i = 0; i < pattern.Length; i++)
            {
                char c = pattern[i];
                if (c == '\\')
                {
                    // \d, \w, \1, \b, ... are classes, references or anchors: the engine's.
                    if (i + 1 >= pattern.Length || char.IsAsciiLetterOrDigit(pattern[i + 1]))
                        return null;
                    text.Append(pattern[++i]);
                    any.Add(false);
                }
                else if (c == '.')
                {
                    text.Append('.');
                    any.Add(true);
                }
                else if ("^$|?*+()[]{}".IndexOf(c) >= 0)
                {
                    return null;
                }
                else
                {
                    text.Append(c);
                    any.Add(false);
                }
            }
            return new Wildcards(text.ToString(), any.ToArray());
        }

        /// <summary><c>re.fullmatch(pattern, key)</c>.</summary>
        internal bool FullMatch(string key) => key.Length == _text.Length && At(key, 0);

        /// <summary><c>re.match(r"(.*\.)?(pattern)$", key)</c>: the key, or its end after a dot, and <c>$</c> also before a final newline.</summary>
        internal bool EndMatch(string key)
        {
            if (EndMatchExact(key))
                return true;
            return key.EndsWith('\n') && EndMatchExact(key[..^1]);
        }

        private bool EndMatchExact(string key)
        {
            int start = key.Length - _text.Length;
            if (start < 0 || !At(key, start))
                return false;
            // Before the match: nothing, or anything without a newline that ends with a dot.
            return start == 0 || key[start - 1] == '.' && key.IndexOf('\n', 0, start - 1) < 0;
        }

        private bool At(string key, int start)
        {
            for (int i = 0; i < _text.Length; i++)
            {
                char c = key[start + i];
                if (_any[i] ? c == '\n' : c != _text[i])
                    return false;
            }
            return true;
        }
    }

    /// <summary>
    /// A config's regular expression that is invalid or ran past its bound; <see cref="Field"/> is the config's key. Read
    /// from a file, it becomes a <see cref="CheckpointFormatException"/> naming the file.
    /// </summary>
    internal sealed class PatternException : ArgumentException
    {
        internal PatternException(string field, string rule) : base($"LoraConfig.{field}: {rule}.")
        {
            Field = field;
            Rule = rule;
        }

        internal string Field { get; }

        internal string Rule { get; }
    }
}
