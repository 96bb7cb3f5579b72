// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama executes it: the template gets .System and
// .Messages (each with .Role and .Content). Reads {"template": ..., "cases": [{"System": ..., "Messages": [...]}]}
// as JSON on stdin and prints a JSON list of the renderings.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	System   string
	Messages []*Message
	Prompt   string
	Response string
}

type Input struct {
	Template string   `json:"template"`
	Cases    []Values `json:"cases"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	out := []string{}
	for _, values := range in.Cases {
		var b strings.Builder
		if err := tmpl.Execute(&b, values); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
